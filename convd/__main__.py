from convd.cli import main

raise SystemExit(main())
