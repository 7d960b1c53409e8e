from mbs_csi.cli import main

raise SystemExit(main())
