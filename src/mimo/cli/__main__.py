"""`python -m mimo.cli ...` = `mimo ...`; what `torchrun ... -m mimo.cli pretrain ...` runs on every rank."""

from mimo.cli import main

raise SystemExit(main())
