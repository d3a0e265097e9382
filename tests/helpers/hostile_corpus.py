"""A corpus of hostile shards: every way a record or a shard can be broken, next to unusual but
valid records that must decode correctly.

``write_hostile_corpus(folder)`` writes the shards and says what one pass through them should
give: usable samples, skips by reason, and a sentinel file that exists only if something
unpickled a record's ``.pyd``/``.pickle``/``.pth`` member.

Scenes are one flat-coloured object on a flat background, so a test can check pixels: the
reference must be the object's colour, the rest of the crop the background's.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

Colour = tuple[int, int, int]
SIZE = (192, 128)  # displayed width, height
OBJECT = (40, 20, 100, 80)  # 60x60 px: 14.6% of the image, inside the 2%-80% filter
RED, BLUE, GREY, WHITE = (220, 30, 30), (30, 30, 220), (110, 110, 110), (255, 255, 255)
# The stored pixels of an image displayed after EXIF orientation ``o``: the inverse transpose.
STORE_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class Case:
    """One record: its tar members, and the SkipSample reason or (None) what it shows."""

    name: str
    members: dict[str, bytes]
    reason: str | None = None
    colour: Colour | None = None  # the object, as displayed
    background: Colour | None = None


@dataclass(frozen=True)
class Outcome:
    """What one pass through some shards gives."""

    samples: int = 0
    skips: Counter = field(default_factory=Counter)

    @property
    def records(self) -> int:  # records the tar reader yields (corrupt, empty shards: none)
        per_shard = ("corrupt_shard", "empty_shard")
        return self.samples + sum(n for r, n in self.skips.items() if r not in per_shard)


@dataclass(frozen=True)
class HostileCorpus:
    shards: list[Path]  # reading order: the last one is healthy, so a pass ends on a record
    cases: list[Case]
    expected: Outcome
    sentinel: Path


# ----------------------------------------------------------------------------- pixels
def canvas(background: object, size: tuple[int, int] = SIZE, dtype: type = np.uint8) -> np.ndarray:
    width, height = size
    channels = (len(background),) if isinstance(background, tuple) else ()
    return np.full((height, width, *channels), background, dtype)


def scene(
    fg: object, bg: object, box: tuple[int, ...] = OBJECT, scale: int = 1, dtype: type = np.uint8
) -> np.ndarray:
    array = canvas(bg, (SIZE[0] * scale, SIZE[1] * scale), dtype)
    x0, y0, x1, y1 = (v * scale for v in box)
    array[y0:y1, x0:x1] = fg
    return array


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(image: Image.Image, **options: object) -> bytes:
    return encode(image, "JPEG", quality=95, **options)


def png(image: Image.Image, **options: object) -> bytes:
    return encode(image, "PNG", **options)


def raw_png(width: int, height: int, colour_type: int, depth: int, pixels: bytes) -> bytes:
    """A PNG written by hand: PIL cannot write 16-bit colour, nor lie about the size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def png16(array: np.ndarray, colour_type: int) -> bytes:
    height, width = array.shape[:2]
    rows = array.astype(">u2").reshape(height, -1)
    pixels = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter byte 0 per row
    return raw_png(width, height, colour_type, 16, pixels)


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[ExifTags.Base.Orientation] = orientation
    return tags.tobytes()


# One IFD entry: orientation (0x0112) typed ASCII (2), count 2, the text "6" inline.
EXIF_ORIENTATION_AS_TEXT = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x02\x00\x00\x00\x026\x00\x00\x00\x00\x00\x00\x00"


def noisy_jpeg() -> bytes:
    # Noise does not compress: cutting the file cuts the pixel data, not only the header.
    pixels = np.random.default_rng(0).integers(0, 255, (128, 192, 3), dtype=np.uint8)
    return jpeg(Image.fromarray(pixels))


def noisy_png() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 255, (128, 192, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels))


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims another size: a bomb in a few KB."""
    at = data.index(b"\xff\xc0") + 5  # marker, length (2), precision (1)
    return data[:at] + struct.pack(">HH", height, width) + data[at + 4 :]


class TouchOnUnpickle:
    """Unpickling this creates ``path``: proof that something unpickled a record member."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable, tuple]:
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def evil_pickle(path: Path) -> bytes:
    return pickle.dumps(TouchOnUnpickle(path), protocol=4)


# ----------------------------------------------------------------------------- records
def meta(boxes: object = (OBJECT,), **extra: object) -> bytes:
    value = [list(b) for b in boxes] if isinstance(boxes, tuple) else boxes
    return json.dumps({"boxes": value, **extra}).encode()


def good_jpeg_record() -> dict[str, bytes]:
    return {"jpg": jpeg(Image.fromarray(scene(RED, GREY)), subsampling=0), "json": meta()}


def decoded_cases(sentinel: Path) -> list[Case]:
    """Unusual but valid records: each must give a sample showing the right colours."""
    red_on_grey = Image.fromarray(scene(RED, GREY))
    palette = Image.new("P", SIZE, 0)
    palette.putpalette([*GREY, *RED])
    palette.paste(1, OBJECT)
    clear_palette = palette.copy()
    clear_palette.info["transparency"] = 0
    big = Image.fromarray(scene(RED, GREY, scale=4))
    partly_out = Image.fromarray(scene(RED, GREY, box=(0, 0, 50, 50)))
    far_corner = Image.fromarray(scene(RED, GREY, box=(150, 80, 192, 128)))
    rgba = scene((*RED, 255), (0, 255, 0, 0))  # the hidden colour must not show
    cmyk = Image.fromarray(scene((0, 255, 255, 0), (0, 0, 0, 145)), mode="CMYK")
    evil = evil_pickle(sentinel)
    cases = [
        Case("rgb_jpeg", {"jpg": jpeg(red_on_grey, subsampling=0), "json": meta()}),
        Case("rgb_png", {"png": png(red_on_grey), "json": meta()}),
        Case("png_bytes_named_jpg", {"jpg": png(red_on_grey), "json": meta()}),
        Case("jpeg_key_spelling", {"jpeg": jpeg(red_on_grey), "json": meta()}),
        Case("big_jpeg_decoded_by_draft", {"jpg": jpeg(big), "json": meta(((160, 80, 400, 320),))}),
        Case("cmyk_jpeg", {"jpg": jpeg(cmyk), "json": meta()}, colour=(255, 0, 0)),
        Case("palette_png", {"png": png(palette), "json": meta()}),
        Case("palette_png_with_transparency", {"png": png(clear_palette), "json": meta()}, None, RED, WHITE),
        Case("rgba_png", {"png": png(Image.fromarray(rgba)), "json": meta()}, None, RED, WHITE),
        Case("rgba_png_16bit", {"png": png16(scene((56540, 7710, 7710, 65535), (0, 65535, 0, 0), dtype=np.uint16), 6), "json": meta()}, None, RED, WHITE),
        Case("rgb_png_16bit", {"png": png16(scene((56540, 7710, 7710), (28270,) * 3, dtype=np.uint16), 2), "json": meta()}),
        Case("webp_lossless", {"webp": encode(Image.fromarray(scene(BLUE, GREY)), "WEBP", lossless=True), "json": meta()}, None, BLUE),
        Case("box_partly_outside_negative", {"png": png(partly_out), "json": meta(((-30, -20, 50, 50),))}),
        Case("box_partly_outside_far", {"png": png(far_corner), "json": meta(((150, 80, 400, 300),))}),
        Case("some_boxes_broken", {"png": png(red_on_grey), "json": meta([[float("nan"), 0, 9, 9], [100, 80, 40, 20], [500, 500, 600, 600], list(OBJECT)])}),
        Case("extra_json_keys", {"png": png(red_on_grey), "json": meta(labels=["x"], source="t", unknown={"deep": [1, None]})}),
        Case("extra_tar_members", {"png": png(red_on_grey), "json": meta(), "txt": b"caption", "cls": b"3", "xyz": b"\x00\xff"}),
        Case("pickle_members_never_decoded", {"png": png(red_on_grey), "json": meta(), "pyd": evil, "pickle": evil, "pth": evil}),
        Case("exif_unreadable", {"jpg": jpeg(red_on_grey, exif=b"Exif\x00\x00" + b"garbage!" * 4), "json": meta()}),
        Case("exif_orientation_out_of_range", {"jpg": jpeg(red_on_grey, exif=exif(99)), "json": meta()}),
        Case("exif_orientation_not_a_number", {"jpg": jpeg(red_on_grey, exif=EXIF_ORIENTATION_AS_TEXT), "json": meta()}),
    ]  # fmt: skip
    return [*cases, *grey_cases(), *orientation_cases()]


def grey_cases() -> list[Case]:
    light, dark = 230, 40
    grey = Image.fromarray(scene(light, dark))
    bilevel = Image.fromarray(scene(True, False, dtype=bool))
    grey_alpha = Image.fromarray(scene((30, 255), (0, 0))).convert("LA")
    return [
        Case("grey_jpeg", {"jpg": jpeg(grey), "json": meta()}, None, (light,) * 3, (dark,) * 3),
        Case("grey_png", {"png": png(grey), "json": meta()}, None, (light,) * 3, (dark,) * 3),
        Case("grey_png_16bit", {"png": png(Image.fromarray(scene(light << 8, dark << 8, dtype=np.uint16))), "json": meta()}, None, (light,) * 3, (dark,) * 3),
        Case("bilevel_png", {"png": png(bilevel), "json": meta()}, None, WHITE, (0, 0, 0)),
        Case("grey_alpha_png", {"png": png(grey_alpha), "json": meta()}, None, (30,) * 3, WHITE),
    ]  # fmt: skip


def orientation_cases() -> list[Case]:
    """The object is where the boxes say once the EXIF orientation is applied, as displayed.

    Twice the size, so the loader also decodes them at a reduced JPEG scale (draft).
    """
    displayed = Image.fromarray(scene(RED, GREY, scale=2))
    boxes = meta(((80, 40, 200, 160),))
    cases = []
    for o, transpose in STORE_TRANSPOSE.items():
        stored = displayed.transpose(transpose)
        members = {"jpg": jpeg(stored, exif=exif(o), subsampling=0), "json": boxes}
        cases.append(Case(f"exif_orientation_{o}_jpeg", members))
    stored = displayed.transpose(STORE_TRANSPOSE[6])
    cases.append(Case("exif_orientation_6_png", {"png": png(stored, exif=exif(6)), "json": boxes}))
    return cases


def skipped_cases() -> list[Case]:
    image = png(Image.fromarray(scene(RED, GREY)))
    truncated_jpeg, truncated_png = noisy_jpeg(), noisy_png()
    bad_crc = bytearray(png(Image.fromarray(scene(RED, GREY))))
    bad_crc[29] ^= 0xFF  # the IHDR checksum
    small = png(Image.new("RGB", (12, 12)))
    gif = encode(Image.fromarray(scene(RED, GREY)).convert("P"), "GIF")
    tiff = encode(Image.fromarray(scene(RED, GREY)), "TIFF")
    image_cases = [
        ("missing_image", {"json": meta()}, "missing_image"),
        ("only_pickle_and_json", {"json": meta(), "pyd": b"\x80\x04N."}, "missing_image"),
        ("image_under_unknown_key", {"gif": gif, "json": meta()}, "missing_image"),
        ("missing_json", {"png": image}, "missing_json"),
        ("only_unknown_members", {"txt": b"hello"}, "missing_json"),
        ("garbage_image", {"jpg": bytes(range(256)) * 8, "json": meta()}, "bad_image"),
        ("zero_byte_image", {"jpg": b"", "json": meta()}, "bad_image"),
        ("truncated_jpeg", {"jpg": truncated_jpeg[: len(truncated_jpeg) * 2 // 3], "json": meta()}, "bad_image"),
        ("truncated_png", {"png": truncated_png[: len(truncated_png) // 2], "json": meta()}, "bad_image"),
        ("png_bad_checksum", {"png": bytes(bad_crc), "json": meta()}, "bad_image"),
        ("gif_named_jpg", {"jpg": gif, "json": meta()}, "bad_image"),
        ("tiff_named_png", {"png": tiff, "json": meta()}, "bad_image"),
        ("smaller_than_the_crop_needs", {"png": small, "json": meta(((0, 0, 6, 6),))}, "too_small"),
        ("png_bomb_30000px", {"png": raw_png(30000, 30000, 2, 8, b"\x00" * 64), "json": meta()}, "too_large"),
        ("png_over_max_pixels", {"png": raw_png(9000, 9000, 2, 8, b"\x00" * 64), "json": meta()}, "too_large"),
        ("jpeg_bomb_60000px", {"jpg": with_jpeg_size(jpeg(Image.new("RGB", (16, 16))), 60000, 60000), "json": meta()}, "too_large"),
    ]  # fmt: skip
    return [Case(name, members, reason) for name, members, reason in image_cases]


def json_cases() -> list[Case]:
    image = png(Image.fromarray(scene(RED, GREY)))
    nan, inf = float("nan"), float("inf")
    raw = {
        "json_not_an_object": (b"[[40, 20, 100, 80]]", "bad_json"),
        "json_a_string": (b'"boxes"', "bad_json"),
        "json_null": (b"null", "bad_json"),
        "json_syntax_error": (b'{"boxes": [[40, 20, 100, 80]', "bad_json"),
        "json_not_utf8": (b'{"boxes": "\x80\x81"}', "bad_json"),
        "json_zero_bytes": (b"", "bad_json"),
        "json_nested_too_deep": (b"[" * 100_000, "bad_json"),
        "boxes_missing": (b'{"labels": ["x"]}', "bad_boxes"),
        "boxes_null": (b'{"boxes": null}', "bad_boxes"),
        "boxes_a_string": (b'{"boxes": "40 20 100 80"}', "bad_boxes"),
        "boxes_an_object": (b'{"boxes": {"x0": 40, "y0": 20, "x1": 100, "y1": 80}}', "bad_boxes"),
        "box_not_a_list": (b'{"boxes": [40, 20, 100, 80]}', "bad_boxes"),
        "box_three_numbers": (b'{"boxes": [[40, 20, 100]]}', "bad_boxes"),
        "box_of_strings": (b'{"boxes": [["40", "20", "100", "80"]]}', "bad_boxes"),
        "box_of_booleans": (b'{"boxes": [[true, false, true, true]]}', "bad_boxes"),
        "box_huge_integer": (b'{"boxes": [[40, 20, 1' + b"0" * 400 + b", 80]]}", "bad_boxes"),
        # Over the default data.max_json_bytes (1 MiB): refused before it is parsed.
        "json_over_a_mebibyte": (
            b'{"boxes": [[40, 20, 100, 80]], "pad": "' + b"x" * (1 << 20) + b'"}',
            "json_too_large",
        ),
    }
    geometry = {
        "box_nan": ([[nan, 20, 100, 80]], "bad_boxes"),
        "box_infinite": ([[40, 20, inf, 80]], "bad_boxes"),
        "box_reversed": ([[100, 80, 40, 20]], "bad_boxes"),
        "box_degenerate": ([[40, 20, 40, 80]], "bad_boxes"),
        "box_negative_and_outside": ([[-50, -50, -10, -10]], "bad_boxes"),
        "box_outside": ([[500, 500, 600, 600]], "bad_boxes"),
        "boxes_empty": ([], "no_valid_box"),
        "box_tiny_area": ([[40, 20, 45, 25]], "no_valid_box"),
        "box_whole_image": ([[0, 0, 192, 128]], "no_valid_box"),
        "boxes_over_max_boxes": ([[40, 20, 100, 80]] * 1001, "too_many_boxes"),
    }
    raw.update({name: (meta(boxes), reason) for name, (boxes, reason) in geometry.items()})
    return [
        Case(name, {"png": image, "json": text}, reason) for name, (text, reason) in raw.items()
    ]


def hostile_cases(sentinel: Path) -> list[Case]:
    decoded = [_default_colours(c) for c in decoded_cases(sentinel)]
    return [*decoded, *skipped_cases(), *json_cases()]


def _default_colours(case: Case) -> Case:
    # Red on grey: the scene most decoded cases draw.
    return Case(case.name, case.members, None, case.colour or RED, case.background or GREY)


# ----------------------------------------------------------------------------- shards
def tar_bytes(records: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in records:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def member_offsets(data: bytes, name: str) -> tuple[int, int]:
    """Where a member's header and its data start in a tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember(name)
        return info.offset, info.offset_data


def write_truncated(folder: Path) -> tuple[Path, Outcome]:
    """Cut in the middle of a member's data: tarfile notices, the shard counts as corrupt."""
    data = tar_bytes([(f"truncated-{i}", good_jpeg_record()) for i in range(4)])
    _, start = member_offsets(data, "truncated-3.jpg")
    path = folder / "truncated.tar"
    path.write_bytes(data[: start + 100])
    return path, Outcome(samples=3, skips=Counter(corrupt_shard=1))


def write_cut_at_header(folder: Path) -> tuple[Path, Outcome]:
    """Cut inside a member's header: tarfile's stream mode takes that for the archive's end,
    so nothing is corrupt to count; the record cut in two lacks its json."""
    data = tar_bytes([(f"cut-{i}", good_jpeg_record()) for i in range(3)])
    header, _ = member_offsets(data, "cut-2.json")
    path = folder / "cut-at-header.tar"
    path.write_bytes(data[: header + 100])
    return path, Outcome(samples=2, skips=Counter(missing_json=1))


def write_not_tars(folder: Path) -> tuple[list[Path], Outcome]:
    text, empty = folder / "not-a-tar.tar", folder / "empty.tar"
    text.write_bytes(b"<html>403 Forbidden</html>\n" * 40)
    empty.write_bytes(b"")
    no_records = folder / "no-records.tar"  # a valid tar without members
    no_records.write_bytes(tar_bytes([]))
    return [text, empty, no_records], Outcome(skips=Counter(corrupt_shard=2, empty_shard=1))


def write_cases(folder: Path, cases: list[Case], per_shard: int = 32) -> tuple[list[Path], Outcome]:
    paths = []
    for start in range(0, len(cases), per_shard):
        chunk = cases[start : start + per_shard]
        path = folder / f"cases-{start // per_shard:03d}.tar"
        records = [(f"case-{start + i:03d}-{c.name}", c.members) for i, c in enumerate(chunk)]
        path.write_bytes(tar_bytes(records))
        paths.append(path)
    skips = Counter(c.reason for c in cases if c.reason)
    return paths, Outcome(samples=sum(c.reason is None for c in cases), skips=skips)


def write_hostile_corpus(folder: Path) -> HostileCorpus:
    """Write the shards into ``folder``; return them with what one pass should give."""
    folder.mkdir(parents=True, exist_ok=True)
    sentinel = folder / "UNPICKLED"
    cases = hostile_cases(sentinel)
    not_tars, not_tars_outcome = write_not_tars(folder)
    truncated, truncated_outcome = write_truncated(folder)
    cut, cut_outcome = write_cut_at_header(folder)
    case_shards, cases_outcome = write_cases(folder, cases)
    outcomes = (not_tars_outcome, truncated_outcome, cut_outcome, cases_outcome)
    expected = Outcome(
        samples=sum(o.samples for o in outcomes), skips=sum((o.skips for o in outcomes), Counter())
    )
    return HostileCorpus([*not_tars, truncated, cut, *case_shards], cases, expected, sentinel)
