"""Counts the Python function calls each thread of a test daemon makes (TENSORD_TEST_PROFILE
names a directory): test_native_core.py uses it to show that no Python runs per request.
`<dir>/dump` asks for a snapshot, written to `<dir>/counts-<n>.json`."""

import collections
import json
import os
import sys
import threading
import time

_dir = os.environ.get("TENSORD_TEST_PROFILE")
if _dir:
    _counts: collections.Counter = collections.Counter()
    _me = "profile-dump"

    def _prof(frame, event, arg):
        if event == "call":
            _counts[threading.current_thread().name + ":" + frame.f_code.co_name] += 1

    def _dumper():
        n = 0
        while True:
            trigger = os.path.join(_dir, "dump")
            if os.path.exists(trigger):
                os.unlink(trigger)
                snap = {k: v for k, v in _counts.items() if not k.startswith(_me)}
                tmp = os.path.join(_dir, f".counts-{n}.json")
                with open(tmp, "w") as f:
                    json.dump(snap, f)
                os.rename(tmp, os.path.join(_dir, f"counts-{n}.json"))
                n += 1
            time.sleep(0.02)

    threading.Thread(target=_dumper, name=_me, daemon=True).start()
    sys.setprofile(_prof)
    threading.setprofile(_prof)
