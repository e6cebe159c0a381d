"""Kept at its old place for users and for models logged before the package was split: the
seg3d pyfunc of those models imports ``mlpipe.preprocessing.rebuild`` when it loads. The name is
the module ``mlpipe.log.preprocessing`` itself, not a copy."""

import sys

from mlpipe.data import preprocessing as _preprocessing

sys.modules[__name__] = _preprocessing
