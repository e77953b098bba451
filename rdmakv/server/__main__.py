"""`python -m rdmakv.server`: a server or the scheduler, as DMLC_ROLE says."""
from rdmakv.server.server import main

raise SystemExit(main())
