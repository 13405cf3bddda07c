"""``python -m hf_memopt`` runs the ``hf-memopt`` command."""

from hf_memopt.tools.cli import main

raise SystemExit(main())
