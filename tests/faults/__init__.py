"""The fault suite: the diode's promises proved end to end with real parts.

``harness`` runs the daemons as child processes (so memory can be measured
and SIGKILL is real) around an in-process fault relay, a mosquitto broker and
a subscriber that counts every value; ``scenarios`` holds one function per
promise, each returning its figures; ``report`` runs them all and rewrites
docs/RELIABILITY.md; ``fuzz`` drives the receiver core under atheris.
"""
