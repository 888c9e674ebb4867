"""Whole-photo face restoration: detection, FFHQ alignment, batched CodeFormer, paste-back.

>>> from codeformer_lightning.inference import FaceRestorer
>>> from codeformer_lightning.io import read_image
>>> restorer = FaceRestorer("codeformer.pth")                  # MTCNN detector, offline
>>> result = restorer.restore(read_image("group.jpg"), w=0.7)   # result.image: (H, W, 3) uint8 RGB
"""

from codeformer_lightning.inference.align import (
    FFHQ_TEMPLATE_512,
    estimate_alignment,
    face_template,
    invert_affine,
    warp_face,
)
from codeformer_lightning.inference.detection import (
    DetectorWeightsError,
    Face,
    MTCNNDetector,
    RetinaFaceDetector,
)
from codeformer_lightning.inference.paste import paste_back
from codeformer_lightning.inference.restorer import FaceRestorer, RestoreResult

__all__ = [
    "FFHQ_TEMPLATE_512",
    "DetectorWeightsError",
    "Face",
    "FaceRestorer",
    "MTCNNDetector",
    "RestoreResult",
    "RetinaFaceDetector",
    "estimate_alignment",
    "face_template",
    "invert_affine",
    "paste_back",
    "warp_face",
]
