"""``python -m dwm_stream.train CONFIG.yaml [key=value ...]`` (and ``composer -n N -m dwm_stream.train ...``)."""
import sys

from dwm_stream.train.entry import main

sys.exit(main())
