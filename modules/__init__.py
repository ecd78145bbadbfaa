"""Network blocks: normalisation layers, residual blocks, DeepLab-v3 heads, per-step classifiers, small helpers.

Importing the package registers the shared parts (``modules.registry``): the ``deeplabv3``, ``aspp`` and
``segformer`` and ``maskformer`` heads (with the ``mask_classification`` wrapper), the ``conv1x1`` classifier, the ``per_step`` layout and the ``residual`` block. A method's own parts register from its
own file when the method imports it (``modules/rcil.py``, ``modules/ssul.py``, ``modules/dropclass.py``).
"""
from modules import aspp as _aspp  # noqa: F401
from modules import deeplab as _deeplab  # noqa: F401
from modules import heads as _heads  # noqa: F401
from modules import maskformer as _maskformer  # noqa: F401
from modules import residual as _residual  # noqa: F401
from modules import segformer_head as _segformer_head  # noqa: F401
