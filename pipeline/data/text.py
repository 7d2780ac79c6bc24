"""Caption text: normalization into word tokens, and the vocabulary that maps words to ids.

Pure Python on purpose: the readers, the training data builder and the exporter all use
it, and importing it must not pull in TensorFlow.

Example:
    >>> normalize_caption("A café-owner's dog, 2 years old!")
    ['a', 'cafe', 'owner', 's', 'dog', 'years', 'old']
    >>> vocabulary = Vocabulary.build([["a", "dog"], ["a", "cat"]], min_count=2)
    >>> vocabulary.words
    ['<pad>', '<start>', '<end>', '<unk>', 'a']
    >>> vocabulary.encode(["a", "dog"])
    [4, 3]
"""

import collections
import unicodedata

from pipeline.core import errors, io_utils
from pipeline.core.run_files import VOCAB_FILE  # noqa: F401  (callers name OUT/vocab.json by it)

PAD_ID = 0
START_ID = 1
END_ID = 2
UNK_ID = 3
PAD_TOKEN = "<pad>"
START_TOKEN = "<start>"
END_TOKEN = "<end>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, START_TOKEN, END_TOKEN, UNK_TOKEN)  # index = id

VOCAB_FORMAT = "captioner.vocab"
VOCAB_VERSION = 1


def normalize_caption(raw):
    """Splits a raw caption into lower-case words.

    The rule, kept simple so that it is easy to predict:
      1. Unicode NFKD, then combining marks are dropped ("café" -> "cafe", "ﬁ" -> "fi").
      2. Lower case.
      3. Words are the maximal runs of letters (`str.isalpha`); everything else (spaces,
         punctuation, digits and other numerals, hyphens, apostrophes) separates words, so
         "t-shirt" -> "t", "shirt", "dog's" -> "dog", "s" and "2 dogs" -> "dogs".
    Single letters such as "a" are words like any other.

    Args:
        raw: str, one caption as it appears in the dataset.
    Returns:
        list[str], the words in order; empty when the caption has no letter at all.
    """
    decomposed = unicodedata.normalize("NFKD", raw)
    without_marks = "".join(character for character in decomposed if not unicodedata.combining(character))
    # Not the regex `[^\W\d_]+`: `\w` also matches numerals outside Nd such as "〇" or "༳".
    lowered = without_marks.lower()
    return "".join(character if character.isalpha() else " " for character in lowered).split()


class Vocabulary:
    """Words <-> integer ids; the four special tokens hold ids 0..3, then words by frequency.

    Attributes:
        words: list[str], index = id; `words[:4]` are `SPECIAL_TOKENS`.
        counts: dict[str, int], training-split occurrences of each kept word (specials absent).
        min_count: int, words seen fewer times than this when building became `<unk>`.
    """

    def __init__(self, words, counts, min_count):
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {list(SPECIAL_TOKENS)}, got {words[:4]}")
        self.words = words
        self.counts = dict(counts)
        self.min_count = int(min_count)
        self._ids = {word: index for index, word in enumerate(words)}
        if len(self._ids) != len(words):
            duplicated = sorted(word for word, count in collections.Counter(words).items() if count > 1)
            raise ValueError(f"duplicated vocabulary words: {duplicated[:5]}")

    @classmethod
    def build(cls, token_lists, min_count):
        """Builds the vocabulary of the given captions (pass the training split only).

        Args:
            token_lists: iterable of list[str], normalized captions (see `normalize_caption`).
            min_count: int >= 1; words seen fewer times are left out and encode as `UNK_ID`.
        Returns:
            Vocabulary: specials first, then words by descending count, ties alphabetical,
            so the same captions give the same ids whatever their order.
        """
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise errors.PipelineError(f"min_word_count must be an integer >= 1, got {min_count!r}")
        counter = collections.Counter()
        for tokens in token_lists:
            counter.update(tokens)
        reserved = set(SPECIAL_TOKENS) & set(counter)
        if reserved:
            raise ValueError(f"captions hold reserved tokens {sorted(reserved)}: normalize them first")
        kept = sorted(
            (word for word, count in counter.items() if count >= min_count),
            key=lambda word: (-counter[word], word),
        )
        return cls(list(SPECIAL_TOKENS) + kept, {word: counter[word] for word in kept}, min_count)

    @classmethod
    def from_dataset(cls, dataset, min_count):
        """The vocabulary of the training split of a `pipeline.data.datasets.Dataset`."""
        token_lists = (
            normalize_caption(caption)
            for record in dataset.images
            if record.split == "train"
            for caption in record.captions
        )
        return cls.build(token_lists, min_count)

    def __len__(self):
        return len(self.words)

    def __eq__(self, other):
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return (self.words, self.counts, self.min_count) == (other.words, other.counts, other.min_count)

    def __repr__(self):
        return f"Vocabulary({len(self.words)} words, min_count={self.min_count})"

    def __contains__(self, word):
        return word in self._ids

    def word_id(self, word):
        """int id of `word`, `UNK_ID` when it is not in the vocabulary."""
        return self._ids.get(word, UNK_ID)

    def encode(self, tokens):
        """list[str] -> list[int] of the same length; unknown words -> `UNK_ID`. No start/end added."""
        return [self._ids.get(token, UNK_ID) for token in tokens]

    def decode(self, ids):
        """Sequence of int ids -> list[str]; stops at `END_ID`, skips `PAD_ID` and `START_ID`.

        `UNK_ID` decodes to "<unk>" so that a reader sees where a word was unknown.
        Accepts Python or NumPy integers (e.g. one row of an int32 [T] array).
        """
        words = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == END_ID:
                break
            if token_id in (PAD_ID, START_ID):
                continue
            if not 0 <= token_id < len(self.words):
                raise ValueError(f"token id {token_id} is outside the vocabulary of {len(self.words)} words")
            words.append(self.words[token_id])
        return words

    def to_dict(self):
        return {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "min_count": self.min_count,
            "words": list(self.words),
            "counts": dict(self.counts),
        }

    def save(self, path):
        """Writes `vocab.json` atomically; `path` is the file (e.g. OUT/vocab.json)."""
        io_utils.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        """Reads a file written by `save`; a missing, foreign or damaged file raises ArtifactError."""
        data, fail = io_utils.read_format_json(path, "vocabulary file", VOCAB_FORMAT, VOCAB_VERSION,
                                               "rerun `extract` to rebuild the vocabulary")
        words, counts, min_count = data.get("words"), data.get("counts"), data.get("min_count")
        if not isinstance(words, list) or not all(isinstance(word, str) and word for word in words):
            fail("field 'words' must be a list of non-empty strings")
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            fail(f"field 'words' must start with {list(SPECIAL_TOKENS)}, found {words[:4]}")
        if len(set(words)) != len(words):
            duplicated = sorted(word for word, count in collections.Counter(words).items() if count > 1)
            fail(f"field 'words' repeats {duplicated[:5]}")
        if not isinstance(counts, dict) or not all(
            isinstance(count, int) and not isinstance(count, bool) and count >= 0 for count in counts.values()
        ):
            fail("field 'counts' must map words to non-negative integers")
        unknown = sorted(set(counts) - set(words))
        if unknown:
            fail(f"field 'counts' names words not in 'words': {unknown[:5]}")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            fail(f"field 'min_count' must be an integer >= 1, got {min_count!r}")
        return cls(words, counts, min_count)
