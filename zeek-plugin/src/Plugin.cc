// SPDX-License-Identifier: BSD-3-Clause

#include "Plugin.h"

#include <zeek/analyzer/Component.h>

#include "Capture.h"

namespace plugin::IoTClass_Capture {

Plugin plugin;

zeek::plugin::Configuration Plugin::Configure() {
    // Capture analyzers are attached by HookSetupAnalyzerTree(), never instantiated by
    // Zeek itself (no factory); the component names them and lets scripts switch capture
    // off with Analyzer::disable_analyzer(Analyzer::ANALYZER_IOTCLASS_CAPTURE).
    AddComponent(new zeek::analyzer::Component("IoTClass_Capture", nullptr));

    EnableHook(zeek::plugin::HOOK_SETUP_ANALYZER_TREE);
    // Parked windows end at a network time, like capture.zeek's scheduled window_end.
    EnableHook(zeek::plugin::HOOK_UPDATE_NETWORK_TIME);

    zeek::plugin::Configuration config;
    config.name = "IoTClass::Capture";
    config.description = "iotcls flow records of device connections, captured without per-packet script events";
    config.version.major = 0;
    config.version.minor = 1;
    config.version.patch = 0;
    return config;
}

void Plugin::InitPostScript() {
    zeek::plugin::Plugin::InitPostScript();
    recorder.InitPostScript();

    // Without the iotcls package loaded, stay out of the way of every connection and packet.
    if ( ! recorder.Ready() ) {
        DisableHook(zeek::plugin::HOOK_SETUP_ANALYZER_TREE);
        DisableHook(zeek::plugin::HOOK_UPDATE_NETWORK_TIME);
    }
}

void Plugin::HookSetupAnalyzerTree(zeek::Connection* conn) { recorder.Attach(conn); }

void Plugin::HookUpdateNetworkTime(double network_time) { recorder.Advance(network_time); }

} // namespace plugin::IoTClass_Capture
