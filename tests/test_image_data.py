"""Image-text data: patches, the rendered task families, packing with image spans, the TFDS
corpus and real image files.

Answers are checked from the pixels alone: connected components for `count`, the fill of the
bounding box for `shape`, the glyph read back from the picture for `digit` and `sum`.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from jaxllm import ConfigError, DataConfig
from jaxllm.config import validate
from jaxllm.data import ByteTokenizer, images, make_source
from jaxllm.data.image_readers import image_source
from jaxllm.data.image_sources import ImageDocument, ImageTextSource
from jaxllm.data.packing import plan_rows
from jaxllm.infer.voting import extract_answer
from jaxllm.nn.vision import patchify, unpatchify
from jaxllm.rl.verify import is_correct

TOKENIZER = ByteTokenizer()
SIZES = dict(train_size=40, validation_size=10, test_size=10)


# ---------------------------------------------------------------------------------------
# Patches


@pytest.mark.parametrize("xp", [np, jnp])
def test_patches_are_row_major_and_unpatchify_inverts_them(xp):
    image = xp.asarray(np.random.default_rng(0).random((12, 12, 3)), xp.float32)
    patches = patchify(image, 4)
    assert patches.shape == (9, 48)
    for k in range(9):
        r, c = divmod(k, 3)
        np.testing.assert_array_equal(patches[k], image[4 * r:4 * r + 4, 4 * c:4 * c + 4].ravel())
    restored = unpatchify(patches, image_size=12, patch_size=4, channels=3)
    np.testing.assert_array_equal(restored, image)


# ---------------------------------------------------------------------------------------
# The rendered families, checked from their pixels


def painted(image: np.ndarray) -> np.ndarray:
    return image.any(-1)


def read_digit(region: np.ndarray, scale: int) -> int:
    """The digit whose glyph the painted pixels of `region` show, sampled once a block."""
    ys, xs = np.nonzero(painted(region))
    bits = painted(region)[ys.min():ys.max() + 1:scale, xs.min():xs.max() + 1:scale]
    found = [d for d in range(10) if np.array_equal(bits, images.glyph_mask(d, 1))]
    assert len(found) == 1, bits
    return found[0]


def box_fill(image: np.ndarray) -> float:
    ys, xs = np.nonzero(painted(image))
    box = painted(image)[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return box.mean()


def problems(family: str, seed: int, count: int = 40) -> list[images.ImageProblem]:
    rng = np.random.default_rng(seed)
    return [images.generate(family, rng) for _ in range(count)]


@pytest.mark.parametrize("family", images.FAMILIES)
def test_rendering_is_deterministic_from_the_seed(family):
    first, again, other = problems(family, 1), problems(family, 1), problems(family, 2)
    assert [p.answer for p in first] == [p.answer for p in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, other))


@pytest.mark.parametrize("family", images.FAMILIES)
def test_chance_is_the_rate_of_the_commonest_answer(family):
    answers = [p.answer for p in problems(family, 9, count=600)]
    commonest = max(answers.count(a) for a in set(answers)) / len(answers)
    assert abs(commonest - images.CHANCE[family]) < 0.06


def test_colour_and_shape_answers_match_the_pixels():
    for problem in problems("colour", 3):
        colours = np.unique(problem.image[painted(problem.image)], axis=0)
        np.testing.assert_array_equal(colours, [images.COLOURS[problem.answer]])
    fills = {"square": (0.99, 1.0), "circle": (0.7, 0.9), "triangle": (0.4, 0.65)}
    for problem in problems("shape", 4, count=60):
        low, high = fills[problem.answer]
        assert low <= box_fill(problem.image) <= high, problem.answer


def test_count_answers_are_the_connected_components():
    answers = []
    for problem in problems("count", 5, count=60):
        _, components = ndimage.label(painted(problem.image), structure=np.ones((3, 3)))
        assert str(components) == problem.answer
        answers.append(components)
    assert set(answers) == {1, 2, 3, 4}


def test_digit_and_sum_answers_are_the_glyphs_shown():
    assert len({images.glyph_mask(d, 1).tobytes() for d in range(10)}) == 10
    for problem in problems("digit", 6):
        assert str(read_digit(problem.image, 3)) == problem.answer
    for problem in problems("sum", 7):
        a, b = read_digit(problem.image[:, :12], 3), read_digit(problem.image[:, 12:], 3)
        assert (problem.answer, problem.thought) == (str(a + b), f"{a}+{b}={a + b}")


def test_documents_hold_the_marker_and_a_verifiable_answer():
    for problem in problems("sum", 8, count=5) + problems("count", 8, count=5):
        text = images.document(problem)
        assert text.startswith(f"Q: {images.IMAGE}{problem.question}\n<think>")
        assert is_correct("arithmetic", extract_answer(text), problem.answer)


# ---------------------------------------------------------------------------------------
# Packing image spans


def random_documents(rng: np.random.Generator, count: int) -> list[ImageDocument]:
    """Documents named by their text, each with 0 to 2 random 8x8 images."""
    documents = []
    for i in range(count):
        pictures = tuple(rng.integers(0, 256, (8, 8, 3), np.uint8)
                         for _ in range(int(rng.integers(3))))
        words = [f"d{i}"] + ["x" * int(rng.integers(1, 6)) for _ in range(len(pictures) + 1)]
        text = words[0] + " " + "".join(w + images.IMAGE for w in words[1:-1]) + words[-1]
        documents.append(ImageDocument(text, pictures, f"d{i}"))
    return documents[:1] + [d for d in documents[1:] if d.images or rng.random() < 0.5]


def check_row(row: dict, documents: dict[str, ImageDocument], source: ImageTextSource,
              max_patches: int) -> int:
    """Asserts that each span of the row is whole and within one document, that the row's
    patches are its documents' images in order, and that no `<patch>` is a target; returns the
    images seen."""
    special, span = TOKENIZER.special, source.span()
    inputs, segments = row["inputs"], row["segment_ids"]
    starts = np.flatnonzero(inputs == special["<image>"])
    for start in starts:
        assert list(inputs[start:start + len(span)]) == span
        assert len(set(segments[start:start + len(span)])) == 1
    assert (inputs == special["<patch>"]).sum() == len(starts) * 4
    expected = []
    for segment in np.unique(segments[segments > 0]):
        text = TOKENIZER.decode(inputs[segments == segment])
        name = text.removeprefix("<bos>").split(" ")[0]
        if name in documents:
            expected += [image / 255 for image in documents[name].images]
    patches = row["patches"]
    assert len(expected) * 4 <= max_patches
    for k, image in enumerate(expected):
        got = unpatchify(patches[4 * k:4 * k + 4], image_size=8, patch_size=4, channels=3)
        np.testing.assert_allclose(got, image, rtol=1e-6)
    assert not patches[4 * len(expected):].any()
    is_patch = row["targets"] == special["<patch>"]
    assert not row["loss_mask"][is_patch].any()
    real_target = (segments > 0) & (np.append(segments[1:], 0) == segments)
    np.testing.assert_array_equal(row["loss_mask"] > 0, real_target & ~is_patch)
    return len(expected)


@pytest.mark.parametrize("seed", range(3))
def test_packing_keeps_image_spans_whole_and_patches_in_token_order(seed):
    rng = np.random.default_rng(seed)
    documents = random_documents(rng, 40)
    texts = ["plain text " * int(rng.integers(1, 8)) for _ in range(5)]
    max_patches = 8 if seed == 2 else None  # a patch budget tighter than the tokens'
    source = ImageTextSource(documents, TOKENIZER, image_size=8, patch_size=4, seed=seed,
                             texts=texts, text_share=0.25, max_patches=max_patches)
    seq_len = int(rng.integers(40, 90))
    budget = source.row_patches(seq_len)
    by_name = {d.name: d for d in documents}
    stream, seen = source.batches(2, seq_len), 0
    for _ in range(30):
        batch = next(stream)
        assert batch["patches"].shape == (2, budget, 48) and budget % 4 == 0
        seen += sum(check_row({k: v[i] for k, v in batch.items()}, by_name, source, budget)
                    for i in range(2))
    assert seen > 30


def test_plans_respect_both_budgets_greedily_and_ignore_zero_patches():
    rng = np.random.default_rng(0)
    lengths, counts = rng.integers(1, 9, 200), rng.integers(0, 3, 200) * 4
    assert plan_rows(lengths, 16) == plan_rows(lengths, 16, patch_counts=0 * counts,
                                               max_patches=0)
    plan = plan_rows(lengths, 16, patch_counts=counts, max_patches=8)
    assert plan[0][0] == 0 and plan[-1][1] == 200
    for (first, stop), (following, _) in zip(plan, plan[1:] + [(200, 0)]):
        assert following == stop
        assert lengths[first:stop].sum() <= 16 and counts[first:stop].sum() <= 8
        if stop < 200:  # greedy: the next document would overflow one of the budgets
            assert (lengths[first:stop + 1].sum() > 16) or (counts[first:stop + 1].sum() > 8)


def test_image_documents_that_cannot_be_packed_are_refused_by_name():
    image = np.zeros((8, 8, 3), np.uint8)
    long = ImageDocument("a" * 60 + images.IMAGE, (image,), "long.jsonl:3")
    source = ImageTextSource([long], TOKENIZER, image_size=8, patch_size=4)
    with pytest.raises(ValueError, match="long.jsonl:3: 68 tokens"):
        next(source.batches(1, 64))
    cases = [(ImageDocument("<patch>" + images.IMAGE, (image,), "spelled"), "spelled: the text"),
             (ImageDocument("no marker", (image,), "unmarked"), "unmarked: 0 <image> markers"),
             (ImageDocument(images.IMAGE, (image[:4],), "small"), r"small: an image is uint8")]
    for document, message in cases:
        with pytest.raises(ValueError, match=message):
            ImageTextSource([document], TOKENIZER, image_size=8, patch_size=4)
    # A mixed-in text's <patch> would take a patch of a later image in its row.
    fine = ImageDocument(images.IMAGE, (image,), "fine")
    with pytest.raises(ValueError, match="text document 0: the text holds <image>, </image> "
                                         "or <patch>, which only an image document may"):
        ImageTextSource([fine], TOKENIZER, image_size=8, patch_size=4, texts=["a <patch> b"],
                        text_share=0.5)


# ---------------------------------------------------------------------------------------
# The TFDS corpus


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from jaxllm.data import image_corpus

    path = tmp_path_factory.mktemp("tfds")
    image_corpus.prepare(str(path), seed=0, **SIZES)
    return path


def test_corpus_splits_are_full_disjoint_and_deterministic(corpus_dir):
    import tensorflow_datasets as tfds

    from jaxllm.data import image_corpus

    builder = image_corpus.prepare(str(corpus_dir), seed=0, **SIZES)
    keys = {}
    for split, size in zip(image_corpus.SPLITS, SIZES.values()):
        examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        assert len(examples) == size
        keys[split] = set()
        for ex in examples:
            family, question = ex["family"].decode(), ex["question"].decode()
            assert ex["image"].shape == (24, 24, 3) and question == images.QUESTIONS[family]
            assert ex["text"].decode().endswith(f"<answer>{ex['answer'].decode()}</answer>")
            keys[split].add(question + ex["image"].tobytes().hex())
        assert len(keys[split]) == size
    assert not (keys["train"] & keys["validation"] or keys["train"] & keys["test"]
                or keys["validation"] & keys["test"])
    config = image_corpus.ImagesConfig(name="again", seed=0, **SIZES)
    again = image_corpus.split_problems(config)["test"]
    assert {p.question + p.image.tobytes().hex() for p in again} == keys["test"]


def test_image_sources_of_the_corpus_by_config_and_by_tfds_name(corpus_dir):
    data = DataConfig(source="images", data_dir=str(corpus_dir), split="validation", **SIZES)
    source = image_source(data, tokenizer=TOKENIZER, image_size=24, patch_size=4)
    named = DataConfig(source="image_tfds", name="jaxllm_images/seed0_size24_40_10_10",
                       data_dir=str(corpus_dir), split="validation")
    by_name = image_source(named, tokenizer=TOKENIZER, image_size=24, patch_size=4)
    first, second = next(source.batches(2, 128)), next(by_name.batches(2, 128))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert first["patches"].shape == (2, 3 * 36, 48) and first["patches"].any()
    assert len(source) == SIZES["validation_size"]


# ---------------------------------------------------------------------------------------
# Image files: a JSONL of records, and its errors


def write_folder(tmp_path, records: list[dict], files: dict[str, bytes | np.ndarray]) -> str:
    for name, content in files.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            Image.fromarray(content).save(tmp_path / name)
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def folder_config(paths: str, **overrides) -> DataConfig:
    return DataConfig(source="image_folder", paths=paths, eval_split=None, **overrides)


def test_a_folder_of_images_is_resized_and_captioned(tmp_path):
    picture = np.zeros((16, 32, 3), np.uint8)
    picture[:, 16:] = 255  # right half white: resized, the right half stays white
    paths = write_folder(tmp_path, [{"image": "a.png", "text": "a half white square"}],
                         {"a.png": picture})
    source = image_source(folder_config(paths), tokenizer=TOKENIZER, image_size=8,
                          patch_size=4)
    row = {k: v[0] for k, v in next(source.batches(1, 32)).items()}
    assert TOKENIZER.decode(row["inputs"]).startswith("<bos><image><patch>")
    image = unpatchify(row["patches"][:4], image_size=8, patch_size=4, channels=3)
    np.testing.assert_array_equal(image[:, :3], 0)
    np.testing.assert_array_equal(image[:, 5:], 1)


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "too_large", "field"])
def test_bad_image_files_are_refused_naming_the_file_and_line(tmp_path, case):
    good = np.full((8, 8, 3), 100, np.uint8)
    Image.fromarray(good).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    files = {"missing": {}, "corrupt": {"bad.png": b"not an image"},
             "truncated": {"bad.png": png[:len(png) // 2]},
             "too_large": {"bad.png": np.zeros((40, 40, 3), np.uint8)}, "field": {}}[case]
    second = {"picture": "bad.png", "text": "t"} if case == "field" else {"image": "bad.png",
                                                                          "text": "t"}
    paths = write_folder(tmp_path, [{"image": "good.png", "text": "fine"}, second], files)
    field = "max_image_pixels" if case == "too_large" else "paths"
    where = f"records.jsonl:2: the image {tmp_path / 'bad.png'}" if case != "field" else (
        "records.jsonl:2 is not a record")
    with pytest.raises(ConfigError, match=rf"^data\.{field}: .*{where}"):
        image_source(folder_config(paths, max_image_pixels=1000), tokenizer=TOKENIZER,
                     image_size=8, patch_size=4)


# ---------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("fields, message", [
    (dict(source="image_folder"), "data.paths: source=image_folder needs"),
    (dict(source="image_folder", paths="a.jsonl"), "data.eval_split: JSONL files are one split"),
    (dict(source="image_tfds"), "data.name: source=image_tfds needs"),
    (dict(source="images", text_share=1.0), r"data.text_share: must be in \[0, 1\)"),
    (dict(text_share=0.5), "data.text_share: mixes text into an image source"),
    (dict(source="images", max_image_pixels=0), "data.max_image_pixels: must be positive"),
])
def test_image_data_fields_are_validated_by_name(fields, message):
    from jaxllm import Config

    with pytest.raises(ConfigError, match=message):
        validate(Config(data=DataConfig(**fields)))


def test_image_sources_need_the_image_tokens(tmp_path):
    class TextOnly(ByteTokenizer):
        def __init__(self):
            super().__init__()
            del self.special["<patch>"]

    paths = write_folder(tmp_path, [{"image": "a.png", "text": "t"}],
                         {"a.png": np.zeros((8, 8, 3), np.uint8)})
    with pytest.raises(ConfigError, match="^data.tokenizer: has no <patch> token"):
        image_source(folder_config(paths), tokenizer=TextOnly(), image_size=8, patch_size=4)


def test_make_source_cuts_the_images_as_model_vision_says(corpus_dir):
    from jaxllm import Config, ModelConfig
    from jaxllm.config import VisionConfig

    data = DataConfig(source="images", data_dir=str(corpus_dir), **SIZES)
    model = ModelConfig(vision=VisionConfig(image_size=24, patch_size=8))
    made = make_source(Config(model=model, data=data), split="validation")
    want = image_source(data, tokenizer=TOKENIZER, image_size=24, patch_size=8,
                        split="validation")
    first, second = next(made.batches(2, 128)), next(want.batches(2, 128))
    assert first["patches"].shape == (2, 128 // 11 * 9, 8 * 8 * 3)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
