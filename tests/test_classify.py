"""``fastres classify`` end to end: a ResNet trained on scikit-learn's digits, exported with its class
names and preprocessing, classifies held-out digits written as PNG files like the trained model does."""
import json

import pytest
import torch
import torchvision
from torchvision.io import write_png

import fastres
from fastres import cli
from fastres.classify import find_images, preprocessing

from digits import MEAN, SIZE, STD, trained_digits_model

CATEGORIES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_IMAGES = 24
# torchvision 0.29 deprecates its image codecs (in favour of torchcodec); the test writes with them
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture(autouse=True)
def torch_backend():
    with fastres.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    """(export path, image dir, {png path: label}): held-out digits as PNGs, some larger and
    non-square (so classify's resize and centre crop matter), some grayscale, one corrupt."""
    model, _, labels, images = trained_digits_model()
    root = tmp_path_factory.mktemp("digits")
    export = root / "digits.safetensors"
    fastres.export(model, export, dtype=torch.float32, categories=CATEGORIES,
                   preprocess={"resize": SIZE, "crop": SIZE, "mean": MEAN, "std": STD})
    image_dir = root / "images"
    (image_dir / "more").mkdir(parents=True)
    files = {}
    for i in range(N_IMAGES):
        pixels = (images[i] * 255).round().to(torch.uint8)         # [3, 16, 16]
        if i % 3 == 1:      # 20x24: resized to 16x19, then centre-cropped
            pixels = torchvision.transforms.functional.resize(pixels, [20, 24], antialias=True)
        if i % 4 == 2:
            pixels = pixels[:1]                                     # grayscale PNG
        path = image_dir / ("more" if i % 2 else "") / f"digit_{i:02d}.png"
        write_png(pixels, str(path))
        files[str(path)] = int(labels[i])
    (image_dir / "broken.png").write_bytes(b"this is not a PNG")
    (image_dir / "notes.txt").write_text("not an image, not picked up from a directory")
    return export, image_dir, files


def trained_model_predictions(paths):
    """The trained model (torchvision's unfused forward, fp32) on torchvision's own preprocessing of
    the decoded files, the steps of the weights' ``transforms()``: Resize, CenterCrop, to float,
    Normalize."""
    from torchvision import transforms as T
    from torchvision.io import ImageReadMode, decode_image

    model, _, _, _ = trained_digits_model()
    transform = T.Compose([T.Resize(SIZE, antialias=True), T.CenterCrop(SIZE),
                           T.ConvertImageDtype(torch.float32), T.Normalize(MEAN, STD)])
    x = torch.stack([transform(decode_image(p, mode=ImageReadMode.RGB)) for p in paths])
    with torch.no_grad():
        return torchvision.models.ResNet.forward(model, x).softmax(-1)


def test_classify_matches_trained_model(digits_files, capsys):
    export, image_dir, files = digits_files
    code = cli.main(["classify", str(image_dir), "--weights", str(export), "--json", "--topk", "3",
                     "--batch", "8", "--workers", "2"])
    out, err = capsys.readouterr()
    assert code == 1          # one file was skipped
    assert "broken.png" in err and "skipped" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == sorted(files, key=lambda p: (p.count("/more/"), p))
    probs = trained_model_predictions([r["path"] for r in rows])
    correct = 0
    for row, p in zip(rows, probs):
        top = row["topk"]
        assert len(top) == 3
        expected_probs, expected_indices = p.topk(3)
        assert [t["index"] for t in top] == expected_indices.tolist(), row["path"]
        assert [t["label"] for t in top] == [CATEGORIES[i] for i in expected_indices.tolist()]
        torch.testing.assert_close(torch.tensor([t["prob"] for t in top]), expected_probs,
                                   atol=1e-4, rtol=1e-3)
        correct += top[0]["index"] == files[row["path"]]
    assert correct >= 0.8 * len(rows)   # the model really learned the digits


def test_classify_text_output_and_files(digits_files, capsys):
    export, image_dir, files = digits_files
    some = sorted(files)[:3]
    code = cli.main(["classify", *some, "--weights", str(export), "--topk", "2", "--workers", "0",
                     "--batch", "2"])
    out, _ = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == some
    for line in lines:
        labels = [part.split(" (")[0] for part in line.split(": ", 1)[1].split(", ")]
        assert len(labels) == 2 and all(label in CATEGORIES for label in labels)
        assert line.endswith("%)")


def test_classify_reports_missing_and_empty(digits_files, tmp_path, capsys):
    export, _, files = digits_files
    code = cli.main(["classify", str(tmp_path / "nope.png"), next(iter(files)), "--weights", str(export)])
    out, err = capsys.readouterr()
    assert code == 1 and "nope.png: no such file" in err and len(out.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert cli.main(["classify", str(tmp_path / "empty"), "--weights", str(export)]) == 2
    assert "no image files found" in capsys.readouterr().err


@pytest.mark.parametrize("weights, match", [
    ("NOT_A_WEIGHT", "unknown weights 'NOT_A_WEIGHT'"),
    ("ResNet50_Weights.NOPE", "unknown weights"),
    ("VGG16_Weights.DEFAULT", "not a ResNet weights enum"),
    ("checkpoints/missing.safetensors", "checkpoints/missing.safetensors: no such file"),
])
def test_classify_bad_weights(digits_files, capsys, weights, match):
    _, _, files = digits_files
    assert cli.main(["classify", next(iter(files)), "--weights", weights]) == 2
    assert match in capsys.readouterr().err


def test_find_images_and_preprocessing(digits_files):
    _, image_dir, files = digits_files
    found, missing = find_images([str(image_dir), "/no/such/dir"])
    assert set(found) == set(files) | {str(image_dir / "broken.png")} and missing == ["/no/such/dir"]
    assert preprocessing({}) == (256, 224)
    assert preprocessing({"preprocess": {"resize": 232, "crop": 224}}) == (232, 224)
    assert preprocessing({"preprocess": {"crop": 64}}) == (64, 64)


def test_classify_odd_and_broken_images(digits_files, tmp_path, capsys):
    """16-bit, palette, CMYK and alpha images are converted and classified; truncated, non-image and
    unsupported files are reported one per line with the reason and skipped; exit status 1."""
    import numpy as np
    from PIL import Image

    export, _, files = digits_files
    source = sorted(files)[0]
    rgb = np.asarray(Image.open(source).convert("RGB"))
    gray = np.asarray(Image.open(source).convert("L"))
    odd = {
        "gray16.png": lambda p: Image.fromarray(gray.astype(np.uint16) * 257).save(p),  # exact 16-bit twin
        "gray8.png": lambda p: Image.fromarray(gray).save(p),
        "palette.png": lambda p: Image.fromarray(rgb).convert("P").save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack([rgb, np.full(gray.shape, 200, np.uint8)])).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p, quality=95),
    }
    for name, write in odd.items():
        write(tmp_path / name)
    Image.fromarray(rgb).resize((64, 64)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("just text")
    Image.fromarray(rgb).save(tmp_path / "bitmap.png", format="BMP")   # a BMP named .png
    paths = sorted(str(p) for p in tmp_path.iterdir() if p.name != "whole.jpg")
    code = cli.main(["classify", *paths, "--weights", str(export), "--json", "--workers", "0",
                     "--batch", "3", "--topk", "1"])
    out, err = capsys.readouterr()
    assert code == 1
    rows = {json.loads(line)["path"].rsplit("/", 1)[1]: json.loads(line)["topk"] for line in out.splitlines()}
    assert set(rows) == set(odd)
    skipped = {line.split("skipped ")[1].split(":")[0].rsplit("/", 1)[1]: line for line in err.splitlines()
               if "skipped" in line}
    assert set(skipped) == {"truncated.jpg", "text.jpg", "bitmap.png"}
    assert "incomplete or truncated" in skipped["truncated.jpg"]
    assert "Unsupported image file" in skipped["text.jpg"] and ".cpp" not in skipped["text.jpg"]
    # the 16-bit PNG holds the 8-bit grayscale values x 257: it must classify exactly as the 8-bit one
    assert rows["gray16.png"] == rows["gray8.png"]
    expected = trained_model_predictions([str(tmp_path / "gray8.png")])[0]
    assert rows["gray8.png"][0]["index"] == int(expected.argmax())
