"""`python -m rdmakv.launch`: the launcher (rdmakv/control/launch.py), under its documented name."""
from rdmakv.control.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
