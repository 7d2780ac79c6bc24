"""CIDEr-D as a reward: many sampled captions scored at once against fixed references.

The same quantity as pycocoevalcap's `CiderScorer` (CIDEr-D, Vedantam et al. 2015), with
two differences of use, not of formula:

- The document frequencies and the corpus size N come once from a fixed corpus (for
  fine-tuning: the training split's references), not from the captions being scored, so a
  reward does not depend on which other images share the batch.
- Captions are integer token ids, and every n-gram of every candidate is handled in NumPy
  arrays (sorts, searches, bincounts): no Python loop per caption or per n-gram.

The formula, as pycocoevalcap computes it (n = 1..4):

    g(x)      = count of n-gram x in the caption * (log N - log max(1, df(x)))
    sim_n     = sum over the candidate's n-grams x of min(g_c(x), g_r(x)) * g_r(x)
                / (|g_c|_n * |g_r|_n)            (only when both norms are non-zero)
                * exp(-(l_c - l_r)^2 / (2 sigma^2)),    sigma = 6
    CIDEr-D   = 10 * mean over n of (sum over the image's references r of sim_n) / #refs

where `l` is what pycocoevalcap counts as the length: the number of *bigrams* (words - 1,
at least 0), a quirk kept so the figures agree to 1e-6 (tested). Fine-tuning appends
`<end>` to candidates and references alike, so "a dog runs on the" (no `<end>` after
"the" in any reference) loses the n-grams "on the <end>", "the <end>" that a complete
caption earns.

Cost. Set-up counts document frequencies only: each image's distinct n-grams come from a
sort of that image's own row (short rows, so linear in the images), and one sort per n
of those distinct n-grams gives the counts. The references are kept as their token ids;
`scores` builds the n-grams of the references of the images it scores, so a reward step
costs what its batch holds, whatever the corpus' size. `state()` keeps the document
frequencies (with a fingerprint of the corpus they came from) for `from_state`, so a
resumed run does not count them again.
"""

import hashlib

import numpy as np

NGRAM_ORDER = 4
SIGMA = 6.0
# n-grams are packed into one int64 as digits of base (vocabulary size + 1); four digits
# must stay below 2**63. Token ids are stored as uint16, which this bound also fits.
MAX_VOCABULARY = 55_000
STATE_FORMAT = "cider-d-document-frequencies-1"
# int64 cells per block of images whose rows are sorted at once (8 MiB): large enough
# that NumPy's per-call overhead vanishes, small enough to stay in cache and in memory.
BLOCK_CELLS = 1 << 20
CONCATENATE_CAPTIONS = 1 << 16  # captions joined per np.concatenate when the ids are first read


def _caption_ngrams(token_ids, lengths, order, base):
    """Each caption's distinct n-grams (n = 1..order) with how often it holds them.

    Args:
        token_ids: int [M, T], rows padded past `lengths`.
        lengths: int [M], tokens per caption.
        order: int, largest n.
        base: int > every token id + 1.
    Returns:
        (rows int64 [G], keys int64 [G], orders int64 [G] in 1..order, counts float64 [G]),
        sorted by row, then key. A key encodes the n-gram's tokens as digits (id + 1) of
        `base`, so every n-gram of order n lies in [base**(n-1), base**n): n-grams of
        different n never collide.
    """
    token_ids = np.asarray(token_ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    count, width = token_ids.shape if token_ids.ndim == 2 else (0, 0)
    columns = np.arange(width)
    digits = np.where(columns[np.newaxis, :] < lengths[:, np.newaxis], token_ids + 1, 0)
    grids, key = [], np.zeros((count, width), dtype=np.int64)
    for n in range(1, min(order, width) + 1):
        span = width - n + 1
        key = key[:, :span] * base + digits[:, n - 1:]
        grids.append(np.where(columns[np.newaxis, :span] + n <= lengths[:, np.newaxis], key, 0))
    if not grids:
        empty = np.zeros((0,), np.int64)
        return empty, empty, empty, np.zeros((0,), np.float64)
    # Sorting each caption's row puts its repeats side by side (0 marks no n-gram, first).
    keys = np.concatenate(grids, axis=1)
    keys.sort(axis=1)
    starts = keys != 0
    starts[:, 1:] &= keys[:, 1:] != keys[:, :-1]
    flat = np.flatnonzero(starts)
    row_width = keys.shape[1]
    rows = flat // row_width
    # A run ends where the next one starts, or at its row's end (the next row begins with its 0s).
    counts = (np.minimum(np.append(flat[1:], keys.size), (rows + 1) * row_width) - flat).astype(np.float64)
    keys = keys.reshape(-1)[flat]
    orders = np.ones(len(keys), dtype=np.int64)
    for n in range(1, order):
        orders += keys >= base ** n
    return rows, keys, orders, counts


def _run_lengths(sorted_values):
    """Sorted int64 [K] -> (distinct values int64 [D], how often each occurs int32 [D])."""
    if len(sorted_values) == 0:
        return sorted_values, np.zeros((0,), np.int32)
    starts = np.empty(len(sorted_values), dtype=bool)
    starts[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=starts[1:])
    first = np.flatnonzero(starts)
    counts = np.diff(first, append=len(sorted_values)).astype(np.int32)
    return sorted_values[first], counts


class Captions:
    """Captions of several images as flat token ids (what `CiderD` scores against).

    Attributes:
        tokens: uint16 [P], every caption's ids one after the other.
        starts: int64 [M + 1], caption m is tokens[starts[m]:starts[m + 1]].
        per_image: int64 [I], captions of each image (image i's come after image i-1's).
        first_caption: int64 [I], index of each image's first caption.
        vocabulary_size: int, every id is below it.

    Built from flat arrays (`Captions(tokens, caption_lengths, per_image, vocabulary_size)`,
    no Python object per caption) or from nested lists (`Captions.from_lists`).
    """

    def __init__(self, tokens, caption_lengths, per_image, vocabulary_size):
        """
        Args:
            tokens: int [P], the captions' ids one after the other (image by image).
            caption_lengths: int [M], ids per caption, summing to P.
            per_image: int [I], captions per image, summing to M.
            vocabulary_size: int. Raises ValueError for an id outside [0, vocabulary_size)
            or sizes that do not add up.
        """
        self.vocabulary_size = int(vocabulary_size)
        self.per_image = np.asarray(per_image, dtype=np.int64).reshape(-1)
        caption_lengths = np.asarray(caption_lengths, dtype=np.int64).reshape(-1)
        self.starts = np.zeros(len(caption_lengths) + 1, dtype=np.int64)
        np.cumsum(caption_lengths, out=self.starts[1:])
        self.first_caption = np.cumsum(self.per_image) - self.per_image
        tokens = np.asarray(tokens).reshape(-1)
        if self.per_image.sum() != len(caption_lengths) or self.starts[-1] != len(tokens) or (
                caption_lengths < 0).any():
            raise ValueError(f"{len(tokens)} token ids, {len(caption_lengths)} caption lengths summing to "
                             f"{self.starts[-1]} and captions per image summing to {self.per_image.sum()} do not match")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocabulary_size):
            raise ValueError(f"token ids must be in [0, {self.vocabulary_size}), got {tokens.min()}..{tokens.max()}")
        self.tokens = tokens.astype(np.uint16, copy=False)

    @property
    def num_captions(self):
        """int, captions of all images."""
        return len(self.starts) - 1

    @classmethod
    def from_lists(cls, captions_per_image, vocabulary_size):
        """list over images of lists of int sequences -> Captions (the ids copied a part at a time,
        so only the uint16 result is ever whole)."""
        per_image = np.fromiter(map(len, captions_per_image), dtype=np.int64, count=len(captions_per_image))
        sequences = [sequence for captions in captions_per_image for sequence in captions]
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        starts = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        tokens = np.empty(starts[-1], dtype=np.uint16)
        for first in range(0, len(sequences), CONCATENATE_CAPTIONS):
            part = sequences[first:first + CONCATENATE_CAPTIONS]
            ids = np.concatenate(part) if starts[first + len(part)] > starts[first] else np.zeros(0, np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() >= vocabulary_size):
                raise ValueError(f"token ids must be in [0, {vocabulary_size}), got {ids.min()}..{ids.max()}")
            tokens[starts[first]:starts[first + len(part)]] = ids
        return cls(tokens, lengths, per_image, vocabulary_size)

    def fingerprint(self, vocabulary_size, order):
        """str: SHA-256 of the ids, the caption and image boundaries, and the key settings."""
        digest = hashlib.sha256(f"{STATE_FORMAT} {vocabulary_size} {order}".encode())
        for array in (self.per_image, self.starts, self.tokens):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def padded(self, captions):
        """int64 [C] caption indices -> (int64 [C, T] ids padded with 0, int64 [C] lengths)."""
        starts = self.starts[captions]
        lengths = self.starts[captions + 1] - starts
        width = int(lengths.max()) if len(lengths) else 0
        columns = np.arange(width)
        inside = columns[np.newaxis, :] < lengths[:, np.newaxis]
        position = np.where(inside, starts[:, np.newaxis] + columns, 0)
        tokens = self.tokens[position] if len(self.tokens) else np.zeros(position.shape, np.uint16)
        return np.where(inside, tokens, 0).astype(np.int64), lengths

    def document_frequencies(self, order, base):
        """In how many images' caption sets each n-gram occurs.

        Returns:
            (keys int64 [D] sorted, counts int32 [D]): every distinct n-gram, n = 1..order.
        """
        total = len(self.tokens)
        image_bounds = np.append(self.first_caption, len(self.starts) - 1)
        segment_start = self.starts[image_bounds[:-1]]
        segment_length = self.starts[image_bounds[1:]] - segment_start
        if total == 0:
            return np.zeros((0,), np.int64), np.zeros((0,), np.int32)
        # Each image's captions, one after the other, as a row of a grid: all n share it.
        grids = [self._grid(images, segment_start, segment_length, order) for images in self._blocks(segment_length)]
        caption_lengths = np.diff(self.starts)
        keys, counts = [], []
        # One n at a time keeps the distinct n-grams of a single n in memory; keys of order n
        # lie below those of order n + 1, so the concatenation is sorted.
        for n in range(1, order + 1):
            # Room for every n-gram; the pages past what the images' distinct ones fill are
            # never touched, so they cost no memory.
            values = np.empty(int(np.maximum(caption_lengths - n + 1, 0).sum()), dtype=np.int64)
            filled = 0
            for digits, left in grids:
                distinct = _distinct_in_rows(digits, left, n, base)
                values[filled:filled + len(distinct)] = distinct
                filled += len(distinct)
            values = values[:filled]
            values.sort()
            ngram_keys, ngram_counts = _run_lengths(values)
            del values
            keys.append(ngram_keys)
            counts.append(ngram_counts)
        return np.concatenate(keys), np.concatenate(counts)

    @staticmethod
    def _blocks(segment_length):
        """Image index arrays of at most ~BLOCK_CELLS padded tokens, images of similar length together."""
        by_length = np.argsort(segment_length, kind="stable")
        sorted_length = np.maximum(segment_length[by_length], 1)
        blocks, start = [], 0
        while start < len(by_length):
            stop = min(len(by_length), start + max(1, BLOCK_CELLS // int(sorted_length[start])))
            # Lengths grow along the order: the block's widest image sets its budget.
            stop = min(stop, start + max(1, BLOCK_CELLS // int(sorted_length[stop - 1])))
            blocks.append(by_length[start:stop])
            start = stop
        return blocks

    def _grid(self, images, segment_start, segment_length, order):
        """Row j: the captions of images[j], one after the other.

        Returns:
            (digits uint16 [len(images), W]: id + 1, 0 past the row's end;
             left uint8 [len(images), W]: tokens left in the cell's caption from it on, at
             most `order`, 0 past the row's end).
        """
        lengths = segment_length[images]
        width = int(lengths.max())
        columns = np.arange(width)
        inside = columns[np.newaxis, :] < lengths[:, np.newaxis]
        position = np.where(inside, segment_start[images][:, np.newaxis] + columns, 0)
        digits = self.tokens[position]
        digits += 1
        digits[~inside] = 0
        # The grid's inside cells, row by row, are the block's captions in order.
        per_image = self.per_image[images]
        captions = np.repeat(self.first_caption[images] - (np.cumsum(per_image) - per_image), per_image)
        captions += np.arange(len(captions))
        caption_lengths = self.starts[captions + 1] - self.starts[captions]
        left = np.zeros(inside.shape, dtype=np.uint8)
        left[inside] = np.minimum(np.repeat(np.cumsum(caption_lengths), caption_lengths)
                                  - np.arange(caption_lengths.sum()), order)
        return digits, left


def _distinct_in_rows(digits, left, n, base):
    """int64 [K]: each row's distinct n-grams (the `Captions._grid` of some images, n >= 1)."""
    span = digits.shape[1] - n + 1
    if span < 1:
        return np.zeros((0,), np.int64)
    key = digits[:, :span].astype(np.int64)
    for offset in range(1, n):
        key *= base
        key += digits[:, offset:offset + span]
    # An n-gram starting where fewer than n tokens are left would run into the next caption.
    key[left[:, :span] < n] = 0
    # Sorting each row puts its repeats side by side (0 marks no n-gram).
    key.sort(axis=1)
    first = key != 0
    first[:, 1:] &= key[:, 1:] != key[:, :-1]
    return key[first]


class CiderD:
    """CIDEr-D of token-id captions against fixed per-image references.

    Example (ids of a toy vocabulary; 2 = `<end>`):

        scorer = CiderD(references=[[[4, 5, 2], [4, 6, 2]], [[7, 8, 2]]], vocabulary_size=9)
        scorer.scores(np.array([[4, 5, 2], [7, 8, 2]]), np.array([3, 3]), np.array([0, 1]))

    Keeping the document frequencies (e.g. with a checkpoint) and using them again:

        np.savez(path, **scorer.state())
        scorer = CiderD.from_state(dict(np.load(path)), references, vocabulary_size=9)
    """

    def __init__(self, references, vocabulary_size, document_frequency_references=None,
                 order=NGRAM_ORDER, sigma=SIGMA, state=None):
        """
        Args:
            references: `Captions`, or a list over images of list of int sequences (token
                ids, `<end>` included when it is to count): the captions a candidate of image
                i is scored against. Every image needs at least one reference.
            vocabulary_size: int, every id is in [0, vocabulary_size).
            document_frequency_references: as `references`, the corpus of document
                frequencies and of N; defaults to `references`.
            order: int, largest n-gram (4 for CIDEr-D).
            sigma: float, the length penalty's standard deviation (6 for CIDEr-D).
            state: a `state()` of a scorer with the same corpus, order and vocabulary size
                (prefer `from_state`): its document frequencies are used instead of counted.
        Raises:
            ValueError: a bad size, an image without references, an id out of range, or a
                `state` that does not belong to this corpus.
        """
        if vocabulary_size >= MAX_VOCABULARY:
            raise ValueError(f"vocabulary_size must be below {MAX_VOCABULARY}, got {vocabulary_size}")
        self.order = int(order)
        self.sigma = float(sigma)
        self.vocabulary_size = int(vocabulary_size)
        self.base = self.vocabulary_size + 1
        self.references = self._captions(references)
        if (self.references.per_image == 0).any():
            raise ValueError("every image needs at least one reference caption")
        corpus = self.references if document_frequency_references is None else self._captions(
            document_frequency_references)
        self.corpus_size = len(corpus.per_image)
        self.log_corpus_size = np.log(float(self.corpus_size)) if self.corpus_size else -np.inf
        self.fingerprint = corpus.fingerprint(self.vocabulary_size, self.order)
        if state is None:
            self.df_keys, self.df_counts = corpus.document_frequencies(self.order, self.base)
        else:
            self.df_keys, self.df_counts = self._checked_state(state)

        self.num_references = self.references.per_image
        self.reference_offsets = self.references.first_caption
        self.max_references = int(self.num_references.max()) if len(self.num_references) else 0

    def _captions(self, captions):
        """A `Captions` (checked for this vocabulary size) or nested lists -> Captions."""
        if not isinstance(captions, Captions):
            return Captions.from_lists(captions, self.vocabulary_size)
        if captions.vocabulary_size > self.vocabulary_size:
            raise ValueError(f"captions of a vocabulary of {captions.vocabulary_size} words for a scorer of "
                             f"{self.vocabulary_size}")
        return captions

    @classmethod
    def from_state(cls, state, references, vocabulary_size, document_frequency_references=None):
        """A scorer whose document frequencies come from `state` (a `state()`), not counted again.

        Raises ValueError when `state` was made from another corpus (its fingerprint differs),
        another vocabulary size or n-gram order.
        """
        missing = sorted({"order", "sigma"} - set(state))
        if missing:
            raise ValueError(f"CIDEr-D state: no {', '.join(map(repr, missing))}")
        return cls(references, vocabulary_size, document_frequency_references,
                   order=int(np.asarray(state["order"])), sigma=float(np.asarray(state["sigma"])), state=state)

    def state(self):
        """The document frequencies and what they belong to, as NumPy arrays (`np.savez` keeps them).

        Returns:
            dict: format (str), fingerprint (str, SHA-256 of the corpus' ids and boundaries),
            vocabulary_size, order, corpus_size (int64), sigma (float64), ngram_keys (int64 [D],
            sorted, n-grams packed as digits id + 1 of base vocabulary_size + 1),
            document_frequencies (int32 [D]).
        """
        return {
            "format": np.asarray(STATE_FORMAT),
            "fingerprint": np.asarray(self.fingerprint),
            "vocabulary_size": np.asarray(self.vocabulary_size, dtype=np.int64),
            "order": np.asarray(self.order, dtype=np.int64),
            "corpus_size": np.asarray(self.corpus_size, dtype=np.int64),
            "sigma": np.asarray(self.sigma, dtype=np.float64),
            "ngram_keys": self.df_keys,
            "document_frequencies": self.df_counts,
        }

    def _checked_state(self, state):
        """(keys int64 [D], counts int32 [D]) of a `state()` that belongs to this corpus, else ValueError."""
        expected = {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "vocabulary_size": self.vocabulary_size,
                    "order": self.order, "corpus_size": self.corpus_size}
        for name, value in expected.items():
            if name not in state:
                raise ValueError(f"CIDEr-D state: no {name!r}")
            found = np.asarray(state[name]).item()
            if found != value:
                raise ValueError(f"CIDEr-D state: {name} {found!r} does not match this corpus' {value!r} "
                                 "(document frequencies of other captions or settings)")
        keys = np.asarray(state["ngram_keys"], dtype=np.int64)
        counts = np.asarray(state["document_frequencies"], dtype=np.int32)
        if keys.ndim != 1 or keys.shape != counts.shape:
            raise ValueError(f"CIDEr-D state: ngram_keys {keys.shape} and document_frequencies {counts.shape} "
                             "must be one-dimensional and of one length")
        return keys, counts

    def _idf(self, keys):
        """float64 [G]: log N - log max(1, df) of each n-gram key (df 0 for unseen n-grams)."""
        if len(self.df_keys) == 0:
            return np.full(len(keys), self.log_corpus_size)
        position = np.minimum(np.searchsorted(self.df_keys, keys), len(self.df_keys) - 1)
        df = np.where(self.df_keys[position] == keys, self.df_counts[position], 0)
        return self.log_corpus_size - np.log(np.maximum(1.0, df))

    def _norms(self, rows, orders, weights, count):
        """float64 [count, order]: the Euclidean norm of each caption's weights per n."""
        squares = np.bincount(rows * self.order + (orders - 1), weights=weights ** 2, minlength=count * self.order)
        return np.sqrt(squares).reshape(count, self.order)

    def scores(self, token_ids, lengths, image_indices):
        """CIDEr-D of each candidate against the references of its image.

        Args:
            token_ids: int [M, T] candidate token ids, anything past `lengths` ignored.
            lengths: int [M], tokens per candidate (`<end>` included when it is to count).
            image_indices: int [M], which image's references (index into `references`).
        Returns:
            np.ndarray float64 [M].
        """
        token_ids = np.asarray(token_ids)
        lengths = np.asarray(lengths, dtype=np.int64)
        image_indices = np.asarray(image_indices, dtype=np.int64)
        count = len(lengths)
        if count == 0:
            return np.zeros((0,), np.float64)
        rows, keys, orders, counts = _caption_ngrams(token_ids, lengths, self.order, self.base)

        # The references of the batch's images, batch-local: image slot s holds references
        # slot_first[s] .. slot_first[s] + slot_count[s] - 1.
        images, slot = np.unique(image_indices, return_inverse=True)
        slot = slot.reshape(-1)
        slot_count = self.num_references[images]
        slot_first = np.cumsum(slot_count) - slot_count
        captions = np.repeat(self.reference_offsets[images] - slot_first, slot_count) + np.arange(slot_count.sum())
        reference_tokens, reference_lengths = self.references.padded(captions)
        ref_rows, ref_keys, ref_orders, ref_counts = _caption_ngrams(
            reference_tokens, reference_lengths, self.order, self.base)

        # Dense ids of the batch's n-grams: one sorted search of the document frequencies,
        # and small integers to pair candidates with reference n-grams.
        batch_keys, dense = np.unique(np.concatenate([keys, ref_keys]), return_inverse=True)
        dense = dense.reshape(-1)
        idf = self._idf(batch_keys)
        candidate_dense, reference_dense = dense[:len(keys)], dense[len(keys):]
        weights = counts * idf[candidate_dense]
        ref_weights = ref_counts * idf[reference_dense]
        candidate_norms = self._norms(rows, orders, weights, count)
        reference_norms_all = self._norms(ref_rows, ref_orders, ref_weights, len(captions))

        # Each candidate n-gram meets every reference of its image holding the same n-gram.
        reference_slot = np.repeat(np.arange(len(images)), slot_count)
        table = reference_slot[ref_rows] * len(batch_keys) + reference_dense
        sort = np.argsort(table, kind="stable")
        table, table_reference, table_weight = table[sort], ref_rows[sort], ref_weights[sort]
        lookup = slot[rows] * len(batch_keys) + candidate_dense
        first = np.searchsorted(table, lookup, side="left")
        matches = np.searchsorted(table, lookup, side="right") - first
        total = int(matches.sum())
        entries = np.repeat(first, matches) + (np.arange(total) - np.repeat(np.cumsum(matches) - matches, matches))
        reference = table_reference[entries]
        candidate_row = np.repeat(rows, matches)
        width = int(slot_count.max())
        position = reference - slot_first[slot[candidate_row]]
        flat = (candidate_row * width + position) * self.order + (np.repeat(orders, matches) - 1)
        clipped = np.minimum(np.repeat(weights, matches), table_weight[entries]) * table_weight[entries]
        dots = np.bincount(flat, weights=clipped, minlength=count * width * self.order)
        dots = dots.reshape(count, width, self.order)

        # Per candidate and reference position: norms, lengths, a mask for the padding positions.
        positions = np.arange(width)
        present = positions[np.newaxis, :] < slot_count[slot][:, np.newaxis]
        reference_index = np.where(present, slot_first[slot][:, np.newaxis] + positions, 0)
        reference_norms = reference_norms_all[reference_index]  # [M, R, order]
        product = candidate_norms[:, np.newaxis, :] * reference_norms
        similarity = np.where(product != 0, dots / np.where(product != 0, product, 1.0), dots)
        candidate_length = np.maximum(lengths - 1, 0).astype(np.float64)
        reference_length = np.maximum(reference_lengths - 1, 0).astype(np.float64)
        delta = candidate_length[:, np.newaxis] - reference_length[reference_index]
        similarity = similarity * np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, :, np.newaxis]
        similarity = np.where(present[:, :, np.newaxis], similarity, 0.0)
        per_order = similarity.sum(axis=1) / slot_count[slot][:, np.newaxis]
        return 10.0 * per_order.mean(axis=1)
