"""``python -m dwm_stream.train CONFIG.yaml [key=value ...]`` (and ``composer -n N -m dwm_stream.train ...``)."""
import sys

from dwm_stream.train.precheck import check_before_imports

try:
    check_before_imports(sys.argv[1:])  # a schema error in a second, before torch and Composer are imported
except (ValueError, FileNotFoundError) as e:
    print(f'dwm-stream train: error: {e}', file=sys.stderr)
    sys.exit(2)

from dwm_stream.train.entry import main  # noqa: E402

sys.exit(main())
