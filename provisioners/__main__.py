"""``python -m provisioners`` runs the ``jupyter-provisioners`` command line."""

from .cli import main

raise SystemExit(main())
