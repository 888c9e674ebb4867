"""`codeformer-restore`: real photos, aligned faces, bad inputs, safety of inputs, videos."""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import shared_folder
from PIL import Image

from codeformer_lightning.inference.cli import main


def _digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_whole_photos_with_default_detector(tmp_path, tiny_weights, capsys):
    whole = shared_folder("whole")
    before = _digests(whole)
    out = tmp_path / "out"
    assert main([str(whole), "-o", str(out), "--weights", str(tiny_weights), "-w", "0.3", "0.8"]) == 0
    err = capsys.readouterr().err
    assert "processed 4 image(s)" in err and "skipped" not in err
    for path in sorted(whole.iterdir()):
        original = Image.open(path)
        crops = sorted((out / "cropped_faces").glob(f"{path.stem}_*.png"))
        print(f"{path.name}: {len(crops)} face(s)")
        assert crops, f"no face restored in {path.name}"
        assert len(list((out / "restored_faces").glob(f"{path.stem}_*_w0.30.png"))) == len(crops)
        for w in ("0.30", "0.80"):
            final = Image.open(out / "final_results" / f"{path.stem}_w{w}.png")
            assert final.size == original.size
            assert final.mode == ("RGBA" if original.mode == "RGBA" else "RGB")  # alpha kept
        grid = Image.open(out / "comparison" / f"{path.stem}.png")
        assert grid.size == (3 * original.width, original.height)
    assert _digests(whole) == before


def test_aligned_faces_upscale_and_suffix(tmp_path, tiny_weights):
    aligned = shared_folder("aligned")
    out = tmp_path / "out"
    code = main([str(aligned), "-o", str(out), "--weights", str(tiny_weights), "--aligned", "--suffix", "_cf",
                 "--batch-size", "4", "--no-adain"])
    assert code == 0
    names = sorted(p.name for p in (out / "final_results").iterdir())
    assert names == sorted(f"{p.stem}_cf.png" for p in aligned.iterdir())
    assert all(Image.open(out / "final_results" / n).size == (32, 32) for n in names)
    assert len(list((out / "restored_faces").iterdir())) == len(names)
    assert not (out / "comparison").exists()


def _bad_inputs(folder: Path) -> dict[str, str]:
    """A folder of awkward files; returns name -> what the summary must say (or '' if processed)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noface.png")
    Image.fromarray(noise[..., 0], "L").save(folder / "gray.png")
    Image.fromarray(np.dstack([noise, np.full((48, 64), 128, np.uint8)]), "RGBA").save(folder / "rgba.png")
    Image.fromarray(noise[..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(noise[:5, :7]).save(folder / "tiny.png")
    Image.fromarray(np.kron(noise, np.ones((4, 4, 1), np.uint8))).save(folder / "big.jpg")
    data = (folder / "big.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)))
    (folder / "notes.jpg").write_text("this is text, not a JPEG")
    return {"noface.png": "", "gray.png": "", "rgba.png": "", "deep16.png": "", "tiny.png": "",
            "big.jpg": "", "truncated.jpg": "truncated", "corrupt.png": "not an image", "notes.jpg": "not an image"}


def test_bad_inputs_are_reported_and_the_batch_goes_on(tmp_path, tiny_weights, capsys):
    inputs = tmp_path / "inputs"
    expected = _bad_inputs(inputs)
    (tmp_path / "readme.md").write_text("not an image either")
    before = _digests(inputs)
    out = tmp_path / "out"
    code = main([str(inputs), str(tmp_path / "readme.md"), str(tmp_path / "nothing_here.png"),
                 "-o", str(out), "--weights", str(tiny_weights)])
    err = capsys.readouterr().err
    assert code == 0
    processed = [n for n, why in expected.items() if not why]
    assert f"processed {len(processed)} image(s)" in err
    for name, why in expected.items():
        if why:
            assert any(name in line and why in line for line in err.splitlines()), (name, err)
        else:
            final = Image.open(out / "final_results" / f"{Path(name).stem}.png")
            assert final.size == Image.open(inputs / name).size
    assert "readme.md" in err and "nothing_here.png: no such file" in err
    assert "smaller than the smallest detectable face" in err
    assert _digests(inputs) == before  # inputs untouched


def test_nothing_processable_returns_nonzero(tmp_path, tiny_weights, capsys):
    (tmp_path / "a.png").write_text("text")
    assert main([str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights)]) == 1
    assert main([str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights)]) == 1
    assert "no input" in capsys.readouterr().err


def test_argument_errors(tmp_path, tiny_weights, capsys):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    cases = [
        ([str(image), "-o", str(tmp_path / "o"), "--weights", str(tmp_path / "none.pth")], "no such file"),
        ([str(image), "-o", str(tmp_path / "o"), "--weights", str(tiny_weights), "-w", "-0.5"], ">= 0"),
        ([str(image), "-o", str(tmp_path / "o"), "--weights", str(tiny_weights), "--batch-size", "0"], "positive"),
        ([str(image.parent), "-o", str(image.parent / "results"), "--weights", str(tiny_weights)], "inside input folder"),
        ([str(image.parent), "-o", str(image.parent), "--weights", str(tiny_weights)], "inside input folder"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in image.parent.iterdir()) == ["a.png"]


def test_same_names_from_different_folders_do_not_collide(tmp_path, tiny_weights):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.full((24, 24, 3), 100 if sub == "a" else 200, np.uint8)).save(tmp_path / sub / "x.png")
    out = tmp_path / "out"
    assert main([str(tmp_path / "a"), str(tmp_path / "b" / "*.png"), "-o", str(out), "--weights", str(tiny_weights)]) == 0
    finals = sorted(p.name for p in (out / "final_results").iterdir())
    assert finals == ["x.png", "x_1.png"]
    assert np.asarray(Image.open(out / "final_results" / "x_1.png")).mean() == 200


def _write_clip(path: Path, frames: int = 5, rate: int = 12, audio: bool = False) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("aac", rate=16000) if audio else None
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            tone = (0.2 * np.sin(np.arange(16000 * frames // rate) / 10.0)).astype(np.float32)[None]
            chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            chunk.sample_rate = 16000
            for packet in sound.encode(chunk):
                container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)


@pytest.mark.parametrize("audio", [False, True])
def test_video_keeps_frame_count_rate_and_audio(tmp_path, tiny_weights, capsys, audio):
    av = pytest.importorskip("av")
    source = tmp_path / "clip.mp4"
    _write_clip(source, audio=audio)
    out = tmp_path / "out"
    assert main([str(source), "-o", str(out), "--weights", str(tiny_weights), "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "5 frames" in err and ("audio (aac) copied" if audio else "no audio track") in err
    with av.open(str(out / "final_results" / "clip.mp4")) as result:
        stream = result.streams.video[0]
        assert Fraction(stream.average_rate) == 12
        assert len(result.streams.audio) == (1 if audio else 0)
        frames = [f.to_ndarray(format="rgb24") for f in result.decode(stream)]
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)


def test_video_source_is_opened_once_and_odd_sizes_are_padded(tmp_path, tiny_weights, capsys, monkeypatch):
    """A 33x25 lossless clip: one open of the source, output padded to 34x26 (last row/column repeated)."""
    import av
    import cv2

    source = tmp_path / "odd.mkv"
    rng = np.random.default_rng(3)
    # smooth colour fields: H.264's 4:2:0 chroma keeps them (noise would lose its colours)
    frames_in = [cv2.resize(rng.integers(0, 255, (3, 4, 3), dtype=np.uint8), (33, 25)) for _ in range(3)]
    with av.open(str(source), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 33, 25, "yuv444p"
        for frame in frames_in:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    opened: list[str] = []
    real_open = av.open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    assert main([str(source), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights)]) == 0
    assert opened.count(str(source)) == 1
    monkeypatch.setattr(av, "open", real_open)
    assert "3 frames, no audio track" in capsys.readouterr().err
    with av.open(str(tmp_path / "out" / "final_results" / "odd.mp4")) as result:
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in result.decode(result.streams.video[0])]
    assert len(frames) == 3 and frames[0].shape == (26, 34, 3)
    for got, sent in zip(frames, frames_in):
        # H.264 at crf 18 with 4:2:0 chroma on 33x25 saturated colour fields: ~5 levels off on average
        # (measured 6.3 on the first frame), against a spread of ~70 levels in the frames themselves
        assert np.abs(got[:25, :33] - sent).mean() < 10 and sent.std() > 40
        assert np.abs(got[25, :33] - sent[24]).mean() < 10 and np.abs(got[:25, 33] - sent[:, 32]).mean() < 10


@pytest.mark.slow
def test_huge_photo_keeps_its_size(tmp_path, tiny_weights, capsys):
    """An 8000-px photo: detection runs on a downscaled copy, the result keeps the full size."""
    import cv2

    photo = np.asarray(Image.open(shared_folder("whole") / "03.jpg").convert("RGB"))
    canvas = np.full((6000, 8000, 3), 120, np.uint8)
    face = cv2.resize(photo, None, fx=8, fy=8, interpolation=cv2.INTER_CUBIC)
    canvas[2000:2000 + face.shape[0], 3000:3000 + face.shape[1]] = face
    Image.fromarray(canvas).save(tmp_path / "huge.jpg", quality=90)
    out = tmp_path / "out"
    assert main([str(tmp_path / "huge.jpg"), "-o", str(out), "--weights", str(tiny_weights)]) == 0
    assert "1 face(s) restored" in capsys.readouterr().err
    assert Image.open(out / "final_results" / "huge.png").size == (8000, 6000)


def test_faces_of_several_images_share_network_batches(tmp_path, tiny_weights, monkeypatch):
    from codeformer_lightning.inference.restorer import FaceRestorer

    calls: list[int] = []
    original = FaceRestorer.restore_faces

    def recording(self, crops, ws, masks=None):
        calls.append(len(crops))
        return original(self, crops, ws, masks)

    monkeypatch.setattr(FaceRestorer, "restore_faces", recording)
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "out"
    assert main([str(tmp_path / "*.png"), "-o", str(out), "--weights", str(tiny_weights), "--aligned",
                 "--batch-size", "4"]) == 0
    assert calls == [4, 4, 2]
    assert len(list((out / "final_results").iterdir())) == 10


def test_upscale_draw_box_and_center_face_flags(tmp_path, tiny_weights):
    whole = shared_folder("whole")
    out = tmp_path / "out"
    assert main([str(whole / "00.jpg"), "-o", str(out), "--weights", str(tiny_weights), "--upscale", "2",
                 "--only-center-face", "--draw-box", "--precision", "bf16"]) == 0
    assert Image.open(out / "final_results" / "00.png").size == (982, 620)
    assert len(list((out / "cropped_faces").iterdir())) == 1  # four people, only the central one


def test_wrong_checkpoint_is_a_clear_error(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    bad = tmp_path / "codeformer.pth"
    bad.write_bytes(b"this is not a checkpoint")
    assert main([str(image), "-o", str(tmp_path / "out"), "--weights", str(bad)]) == 2
    assert "codeformer.pth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
