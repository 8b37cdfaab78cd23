"""inversion/data.py: training images come out upright, RGB, square, in [-1, 1]; clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from inversion.data import (DataError, IMAGE_EXTENSIONS, OBJECT_TEMPLATES, STYLE_TEMPLATES, image_files,
                            load_images, settings_difference, templates)

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def pixel(tensor, y, x):
    """(3,) colour at (y, x) of a (3, H, W) tensor, back in 0..255."""
    return ((tensor[:, y, x] + 1) * 127.5).round().tolist()


def close(colour, expected, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(colour, expected))


def test_an_image_enlarged_more_than_twice_is_warned_of(tmp_path):
    Image.new("RGB", (300, 200), RED).save(tmp_path / "small.png")
    Image.new("RGB", (600, 300), BLUE).save(tmp_path / "fine.png")
    warnings = []
    images = load_images(tmp_path, 512, warn=warnings.append)
    assert images.shape == (2, 3, 512, 512)
    assert warnings == ["small.png is 300x200 px: its centre square is enlarged 2.6x to 512 px, so what is "
                        "learned is a blurry picture (images of 512 px or more work best)"]


def test_a_long_image_a_subfolder_and_other_files_are_warned_of(tmp_path):
    Image.new("RGB", (1800, 600), RED).save(tmp_path / "wide.png")
    Image.new("RGB", (600, 600), BLUE).save(tmp_path / "square.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "more").mkdir()
    Image.new("RGB", (600, 600), BLUE).save(tmp_path / "more" / "inner.png")
    warnings = []
    assert load_images(tmp_path, 64, warn=warnings.append).shape == (2, 3, 64, 64)
    assert warnings == [f"{tmp_path}: skipped 2 entries that are not .png .jpg .jpeg .webp .bmp images (more/, "
                        "notes.txt; subfolders are not searched)",
                        "wide.png is 1800x600 px: only its centre square is used, 67% of it is cut off (crop it to "
                        "the subject first)"]
    only_sub = tmp_path / "only"
    (only_sub / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="not in subfolders"):
        load_images(only_sub, 64)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    # Stored 40 wide x 20 high, red on top, blue below; EXIF orientation 6 says "rotate 90 degrees
    # clockwise to display", so the upright picture is 20 x 40 with blue on the left, red on the right.
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (0, 10, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())

    x = load_images([tmp_path / "phone.jpg"], 20)[0]  # 20 x 40 upright -> centre 20 x 20
    assert close(pixel(x, 10, 2), BLUE) and close(pixel(x, 10, 17), RED)
    assert close(pixel(x, 2, 2), BLUE) and close(pixel(x, 17, 17), RED)  # (unturned: red above blue)


def test_resize_short_side_then_centre_crop(tmp_path):
    im = Image.new("RGB", (60, 30), RED)  # green and blue bands at the sides are cropped away
    im.paste(GREEN, (0, 0, 8, 30))  # 60 x 30 -> 32 x 16, whose centre 16 columns start at 8
    im.paste(BLUE, (52, 0, 60, 30))
    im.save(tmp_path / "wide.png")
    x = load_images(tmp_path / "wide.png", 16)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert all(close(pixel(x[0], y, c), RED, tol=8) for y in (0, 8, 15) for c in (0, 8, 15))
    # upscaling works too, and the values stay in [-1, 1]
    y = load_images([tmp_path / "wide.png"], 64)
    assert y.shape == (1, 3, 64, 64) and y.min() >= -1 and y.max() <= 1


def test_a_very_long_image_is_cropped_before_it_is_resized(tmp_path, monkeypatch):
    """The centre square is cut first: a 40000 x 2 strip gives a 2 x 2 square, never a 20 MB enlargement."""
    im = Image.new("RGB", (40000, 2), GREEN)
    im.paste(RED, (19999, 0, 20001, 2))
    im.save(tmp_path / "strip.png")
    sizes = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(self.size) or
                        real_resize(self, size, *a, **k))
    x = load_images(tmp_path / "strip.png", 16)
    assert sizes == [(2, 2)] and all(close(pixel(x[0], 8, c), RED, tol=8) for c in (0, 15))


def test_an_image_too_large_to_open_safely_is_one_line(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # PIL refuses more than twice this
    with pytest.raises(DataError, match="big.png: it has more than 2,000 pixels"):
        load_images(tmp_path / "big.png", 16)


def test_transparency_goes_on_white_and_every_mode_becomes_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))  # left half opaque red, right half transparent
    rgba.save(tmp_path / "a_rgba.png")
    la = Image.new("LA", (8, 8), (0, 0))  # fully transparent black -> white
    la.save(tmp_path / "b_la.png")
    grey = Image.new("L", (8, 8), 100)
    grey.save(tmp_path / "c_grey.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 4, 8))  # left: index 0, transparent; right: index 1, blue
    pal.save(tmp_path / "d_palette.png", transparency=0)
    opaque = Image.new("P", (8, 8), 0)
    opaque.putpalette([0, 0, 0] * 256)  # a full palette: Pillow 11 writes a BMP it cannot read back without one
    opaque.save(tmp_path / "e_palette_opaque.bmp")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "f_16bit.png")

    x = load_images(tmp_path, 8)
    assert x.shape == (6, 3, 8, 8)
    assert close(pixel(x[0], 4, 1), RED, 2) and close(pixel(x[0], 4, 6), WHITE, 2)
    assert close(pixel(x[1], 4, 4), WHITE, 2)
    assert pixel(x[2], 4, 4) == [100, 100, 100]
    assert close(pixel(x[3], 4, 1), WHITE, 2) and close(pixel(x[3], 4, 6), BLUE, 2)
    assert close(pixel(x[4], 4, 4), (0, 0, 0), 2)
    assert close(pixel(x[5], 4, 4), WHITE, 2)


def test_folder_is_sorted_and_filtered_by_extension(tmp_path):
    formats = {"b.JPG": "JPEG", "a.png": "PNG", "c.webp": "WEBP", "d.bmp": "BMP", "e.jpeg": "JPEG"}
    for name, fmt in formats.items():
        Image.new("RGB", (4, 4)).save(tmp_path / name, format=fmt)
    (tmp_path / "captions.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.JPG", "c.webp", "d.bmp", "e.jpeg"]
    assert load_images(str(tmp_path), 4).shape == (5, 3, 4, 4)


def test_empty_folder_error_names_the_folder_and_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        load_images(tmp_path, 8)
    message = str(info.value)
    assert f"no images found in {tmp_path}" in message and "\n" not in message
    assert all(ext in message for ext in IMAGE_EXTENSIONS)
    assert isinstance(info.value, ValueError)


def test_unreadable_and_truncated_files_are_named(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read .*junk\.png: "):
        load_images(tmp_path, 8)

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read .*cut\.jpg: .*truncated"):
        load_images([tmp_path / "cut.jpg"], 8)
    with pytest.raises(DataError, match=r"cannot read .*missing\.png: no such file"):
        load_images([tmp_path / "missing.png"], 8)


def test_templates():
    assert templates("object") == OBJECT_TEMPLATES and templates("style") == STYLE_TEMPLATES
    assert len(OBJECT_TEMPLATES) >= 20 and len(STYLE_TEMPLATES) >= 15
    for t in OBJECT_TEMPLATES + STYLE_TEMPLATES:
        assert t.count("{}") == 1 and t.format("<x>").count("<x>") == 1
    assert len(set(OBJECT_TEMPLATES)) == len(OBJECT_TEMPLATES)
    templates("object").append("changed")
    assert "changed" not in OBJECT_TEMPLATES  # a copy
    with pytest.raises(DataError, match="choose 'object' or 'style'"):
        templates("person")


def test_settings_difference_names_what_a_resume_would_change():
    saved = str({"lr": 0.005, "flip": True, "learnable_property": "object", "images": "ab12"})
    assert settings_difference(saved, saved) == "other settings"
    assert settings_difference(saved, str({"lr": 0.01, "flip": False, "learnable_property": "object",
                                           "images": "cd34"})) == \
        "--no-flip now, not in the checkpoint; other images; " \
        "--lr 0.005 in the checkpoint, 0.01 now"
    assert settings_difference(saved, str({"lr": 0.005, "flip": True, "learnable_property": "style",
                                           "images": "ab12", "reg_weight": 0.1})) == \
        "--property 'object' in the checkpoint, 'style' now; --reg-weight unset in the checkpoint, 0.1 now"
    assert settings_difference(str({"flip": False, "per_image_tokens": False}),
                               str({"flip": True, "per_image_tokens": True})) == \
        "--no-flip in the checkpoint, not now; --per-image-tokens now, not in the checkpoint"
    many = {f"setting_{i}": i for i in range(6)}
    assert settings_difference(str(many), str({k: v + 1 for k, v in many.items()})).endswith("; 3 more")
    other_method = str({"source": "a red circle", "tail": 5, "image": "ef56", "lr": 0.005})
    assert settings_difference(saved, other_method) == "another method's settings"  # saved: no telling key
    assert settings_difference(other_method, saved) == "a HiPer (--method hiper) run's settings"
    neti = str({"sigma_t": 0.03, "sigma_l": 2.0, "nested_dropout": 0.5, "bypass": True, "lr": 0.001})
    assert settings_difference(neti, other_method) == "a NeTI (--method neti) run's settings"


def test_settings_difference_runs_no_code_from_a_checkpoint():
    for saved in ("__import__('os').system('false')", "{'lr': ", "[1, 2]", ""):
        assert settings_difference(saved, str({"lr": 0.005})) == "other settings"


def test_a_dark_16_bit_grey_png_stays_dark(tmp_path):
    from inversion.data import to_rgb
    for value in (200, 51400):   # of 65535: near black, and bright
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(tmp_path / f"{value}.png")
    with Image.open(tmp_path / "200.png") as dark, Image.open(tmp_path / "51400.png") as bright:
        assert np.asarray(to_rgb(dark)).max() == 1 and np.asarray(to_rgb(bright)).min() == 200
        as_older_pillows_open_it = dark.convert("I")  # mode "I": the file's format tells it is 16-bit
        assert np.asarray(to_rgb(as_older_pillows_open_it, png=True)).max() == 1
        assert np.asarray(to_rgb(as_older_pillows_open_it)).max() == 200  # otherwise read as 8-bit values


def test_an_image_of_90_to_180_megapixels_is_read_without_pils_warning(tmp_path, monkeypatch):
    """PIL warns (two lines, before the tool's own) between MAX_IMAGE_PIXELS and twice that, at
    opening and again at the crop; such an image is read like any other."""
    import warnings
    from inversion.data import load_image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 = 1600 pixels: between 1x and 2x
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "big.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(tmp_path / "big.png", 16)
    assert image.shape == (3, 16, 16) and not caught, [str(w.message) for w in caught]
