// SPDX-License-Identifier: BSD-3-Clause

#pragma once

#include <zeek/plugin/Plugin.h>

namespace plugin::IoTClass_Capture {

/**
 * IoTClass::Capture: the iotcls package's flow-record capture in C++ (see Capture.h).
 */
class Plugin : public zeek::plugin::Plugin {
protected:
    zeek::plugin::Configuration Configure() override;
    void InitPostScript() override;
    void HookSetupAnalyzerTree(zeek::Connection* conn) override;
    void HookUpdateNetworkTime(double network_time) override;
};

extern Plugin plugin;

} // namespace plugin::IoTClass_Capture
