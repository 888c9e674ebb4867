"""BatchedVideoRestorer: same frames as the single-face path, and a video round trip with audio."""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import torch
from deploy_media import placed_landmarks, textured_image

from codeformer_lightning.deploy import video as vid
from codeformer_lightning.inference.align import estimate_alignment, warp_face
from codeformer_lightning.inference.detection import Face
from codeformer_lightning.inference.paste import paste_back
from codeformer_lightning.io import VideoError, video_info

SIZE = 32  # the tiny network's face size


class ScriptedDetector:
    """Stands in for MTCNN: returns given landmarks per call (cycling), so tests know where faces are."""

    def __init__(self, per_frame: list[list[np.ndarray]]) -> None:
        self.per_frame = per_frame
        self.calls = 0

    def detect(self, image: np.ndarray) -> list[Face]:
        marks = self.per_frame[self.calls % len(self.per_frame)]
        self.calls += 1
        return [Face(np.r_[m.min(0) - 5, m.max(0) + 5], m, 0.99) for m in marks]


# frame 0: two faces, frame 1: none, frame 2: one rotated face partly outside the frame
LANDMARKS = [
    [placed_landmarks(40, 40, 1.0, 0.1, SIZE), placed_landmarks(110, 70, 1.5, -0.3, SIZE)],
    [],
    [placed_landmarks(150, 30, 1.2, 0.5, SIZE)],
]


def make_clip(path, frames: int = 6, fps: int = 12, width: int = 160, height: int = 120, audio: bool = True):
    """Write a small H.264 clip of textured frames, with a 440 Hz AAC tone when ``audio``."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        if audio:
            aus = out.add_stream("aac", rate=16000)
            aus.layout = "mono"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(textured_image(100 + i, height, width), format="rgb24")
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if audio:
            samples = int(16000 * frames / fps)
            t = np.arange(samples) / 16000
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            for start in range(0, samples, 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start : start + 1024]), format="fltp",
                                                   layout="mono")
                chunk.sample_rate = 16000
                chunk.pts = start
                chunk.time_base = Fraction(1, 16000)
                out.mux(aus.encode(chunk))
            out.mux(aus.encode(None))
    return path


def single_face_path(model, frame: np.ndarray, marks: list[np.ndarray], w: float) -> np.ndarray:
    """The reference: warp_face -> network -> paste_back, one face at a time on the CPU, uint8 between."""
    affines = [estimate_alignment(m, SIZE) for m in marks]
    restored = []
    for affine in affines:
        crop = torch.from_numpy(warp_face(frame, affine, SIZE)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            out = model(crop, w=w, adain=True)
        restored.append(((out[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    return paste_back(frame, restored, affines) if restored else frame.copy()


@pytest.mark.parametrize("geometry", ["torch", "cv2"])
def test_batched_frames_match_the_single_face_path(tiny_model, geometry):
    frames = [textured_image(20 + i) for i in range(3)]
    restorer = vid.BatchedVideoRestorer(tiny_model, detector=ScriptedDetector(LANDMARKS), batch_size=2, chunk_frames=3,
                                        geometry=geometry)
    assert restorer.geometry == geometry
    out = restorer.restore_frames(frames, w=0.5)
    assert len(out) == 3 and all(o.shape == f.shape and o.dtype == np.uint8 for o, f in zip(out, frames))
    np.testing.assert_array_equal(out[1], frames[1])  # no face: untouched
    for n in (0, 2):
        ref = single_face_path(tiny_model, frames[n], LANDMARKS[n], 0.5).astype(int)
        diff = np.abs(out[n].astype(int) - ref)
        # both paths feed the network the same uint8 crops (warps agree to < 0.6 before rounding, so only
        # rounding ties differ); what is left is the paste-back's interpolation and the CPU path's uint8
        # rounding of the warped face and of the blend: at most 1-2 grey levels, mean far below one
        # (measured: mean 0.02, max 1)
        assert diff.mean() < 0.25, n
        assert diff.max() <= 2, n
        assert np.abs(out[n].astype(int) - frames[n]).max() > 30  # faces were really restored and pasted


def test_video_round_trip_keeps_frames_size_fps_and_audio(tiny_model, tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=6, fps=12)
    detector = ScriptedDetector(LANDMARKS)
    restorer = vid.BatchedVideoRestorer(tiny_model, detector=detector, batch_size=4, chunk_frames=4)
    assert restorer.geometry == "cv2"  # auto: OpenCV geometry on a CPU device
    report = restorer.restore_video(src, tmp_path / "out.mp4", w=0.7)
    info_in, info_out = video_info(src), video_info(tmp_path / "out.mp4")
    assert info_in["audio"] and info_out["audio"] and report.audio
    for key in ("frames", "fps", "width", "height"):
        assert info_out[key] == info_in[key], key
    assert report.frames == 6 and detector.calls == 6
    assert report.faces == 6  # two cycles of (2, 0, 1) faces over six frames
    with av.open(str(tmp_path / "out.mp4")) as c:
        audio = c.streams.audio[0]
        assert audio.codec_context.name == "aac" and audio.codec_context.sample_rate == 16000
    assert {"detect", "align", "network", "paste", "encode"} <= set(report.seconds)


def test_video_without_audio_and_command(tiny_weights, tmp_path, capsys, monkeypatch):
    src = make_clip(tmp_path / "silent.mp4", frames=3, audio=False)
    monkeypatch.setattr(vid, "MTCNNDetector", lambda *a, **k: ScriptedDetector(LANDMARKS))
    rc = vid.main([str(src), str(tmp_path / "o.mp4"), "--weights", tiny_weights, "-w", "0.5",
                   "--batch-size", "2", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and "3 frames" in text and "audio none" in text
    assert video_info(tmp_path / "o.mp4")["frames"] == 3


def test_bad_inputs_give_clear_errors(tiny_model, tiny_weights, tmp_path, capsys):
    restorer = vid.BatchedVideoRestorer(tiny_model, detector=ScriptedDetector([[]]))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    with pytest.raises(VideoError, match="broken.mp4"):
        restorer.restore_video(broken, tmp_path / "x.mp4")
    with pytest.raises(VideoError, match="missing.mp4"):
        restorer.restore_video(tmp_path / "missing.mp4", tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="one size"):
        restorer.restore_frames([textured_image(0), textured_image(0, 60, 80)])
    assert vid.main([str(broken), str(tmp_path / "x.mp4"), "--weights", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth" in capsys.readouterr().err
    assert vid.main([str(broken), str(tmp_path / "x.mp4"), "--weights", tiny_weights, "--device", "cpu"]) == 1
    assert "broken.mp4" in capsys.readouterr().err


def test_odd_frame_sizes_are_padded_to_even(tiny_model, tmp_path):
    """yuv420p needs even sides: a 33x25 source gives a 34x26 video whose extra row and column repeat
    the last ones (the one documented behaviour of codeformer_lightning.io.VideoWriter)."""
    src = tmp_path / "odd.mkv"
    rng = np.random.default_rng(7)  # smooth colour fields: 4:2:0 chroma keeps them
    frames_in = [cv2.resize(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), (33, 25)) for _ in range(2)]
    with av.open(str(src), "w") as out:  # lossless, so odd sizes are possible in the source
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 33, 25, "yuv444p"
        for frame in frames_in:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    restorer = vid.BatchedVideoRestorer(tiny_model, detector=ScriptedDetector([[]]))
    report = restorer.restore_video(src, tmp_path / "out.mp4", crf=0)
    assert (report.width, report.height, report.frames) == (34, 26, 2)
    with av.open(str(tmp_path / "out.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(c.streams.video[0])]
    for got, sent in zip(frames, frames_in):
        sent = sent.astype(int)  # crf 0, but 4:2:0 chroma: a few levels off, against a spread of ~70
        assert np.abs(got[:25, :33] - sent).mean() < 8 and sent.std() > 40
        assert np.abs(got[25, :33] - sent[24]).mean() < 8 and np.abs(got[:25, 33] - sent[:, 32]).mean() < 8


def test_unknown_geometry_backend_is_refused(tiny_model):
    with pytest.raises(ValueError, match="geometry must be one of"):
        vid.BatchedVideoRestorer(tiny_model, geometry="opengl")


def _with_variant(model, variant: str):
    import copy

    marked = copy.deepcopy(model)
    marked.variant = variant
    return marked


def test_colorization_weights_restore_frames_at_w0_with_adain(tiny_model, tmp_path, capsys, monkeypatch):
    model = _with_variant(tiny_model, "colorization")
    frames = [textured_image(40 + i) for i in range(3)]
    restorer = vid.BatchedVideoRestorer(model, detector=ScriptedDetector(LANDMARKS), batch_size=2, geometry="cv2")
    assert restorer.task.name == "colorization" and restorer.adain is True
    out = restorer.restore_frames(frames)  # no w: the published colorization's w = 0
    for n in (0, 2):
        ref = single_face_path(model, frames[n], LANDMARKS[n], 0.0).astype(int)
        assert np.abs(out[n].astype(int) - ref).max() <= 2, n
        assert np.abs(out[n].astype(int) - single_face_path(model, frames[n], LANDMARKS[n], 0.5)).max() > 10
    # the command: the task line, and a note when -w overrides the published w = 0
    from codeformer_lightning.checkpoints import save_weights

    weights = str(save_weights(model, tmp_path / "colorization.safetensors"))
    src = make_clip(tmp_path / "clip.mp4", frames=2, audio=False)
    monkeypatch.setattr(vid, "MTCNNDetector", lambda *a, **k: ScriptedDetector(LANDMARKS))
    assert vid.main([str(src), str(tmp_path / "o.mp4"), "--weights", weights, "-w", "0.5", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "task: colorization: w=0, AdaIN on" in captured.err
    assert "w=0.5 instead of the published w=0" in captured.out
    assert "rest of the photo is left unchanged" in captured.out


def test_inpainting_weights_are_refused_with_the_aligned_path_named(tiny_model, tmp_path, capsys):
    model = _with_variant(tiny_model, "inpainting")
    with pytest.raises(vid.TaskError, match="codeformer-restore --aligned"):
        vid.BatchedVideoRestorer(model)
    assert vid.BatchedVideoRestorer(model, task="restoration").task.name == "restoration"
    from codeformer_lightning.checkpoints import save_weights

    weights = str(save_weights(model, tmp_path / "inpainting.safetensors"))
    assert vid.main([str(tmp_path / "any.mp4"), str(tmp_path / "o.mp4"), "--weights", weights]) == 2
    assert "inpainting works on aligned faces only" in capsys.readouterr().err
