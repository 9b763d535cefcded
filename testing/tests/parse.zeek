# The package parses and loads, bare and with Zeek's default scripts, with nothing to say.
# @TEST-EXEC: zeek -a -b $PACKAGE >output 2>&1
# @TEST-EXEC: zeek -a $PACKAGE >>output 2>&1
# @TEST-EXEC: btest-diff output
