"""`python -m rdmakv.info`: versions, transports, devices, settings (rdmakv/control/info.py),
under its documented name."""
from rdmakv.control.info import main

if __name__ == "__main__":
    raise SystemExit(main())
