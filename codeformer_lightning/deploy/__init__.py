"""Deployment: export with the fidelity weight as an input, and batched on-device video restoration.

* :mod:`.export` — ONNX / TorchScript / torch.export with ``w`` as a ``(B,)`` input (``codeformer-export``).
* :mod:`.batched` — ``warp_faces`` / ``paste_faces``: face alignment and paste-back for many faces at
  once on any torch device.
* :mod:`.video` — :class:`BatchedVideoRestorer` and ``codeformer-restore-video``.

Submodules are imported on demand so that ``import codeformer_lightning.deploy`` needs neither
onnx nor PyAV.
"""
