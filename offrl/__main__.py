from offrl.cli import main

raise SystemExit(main())
