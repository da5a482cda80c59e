from mlkv.cli import main

raise SystemExit(main())
