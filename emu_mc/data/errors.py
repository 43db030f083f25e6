"""Errors of the data pipeline: per-sample (skipped and counted) and fatal (stop the run)."""

# Reasons a sample is skipped; the loader counts each (stats()["skipped"]).
MISSING_KEY = "missing_key"  # a required file of the sample is absent (e.g. no image, no caption)
EMPTY_TEXT = "empty_text"  # the caption / all text chunks are empty
BAD_JSON = "bad_json"  # metadata json unreadable or of the wrong shape
NOT_UTF8 = "not_utf8"  # a text member (caption, subtitle) that is not UTF-8
CORRUPT_IMAGE = "corrupt_image"  # image bytes that no decoder accepts (truncated, garbage)
CORRUPT_VIDEO = "corrupt_video"  # video bytes that no decoder accepts, or no frames
UNREADABLE_SAMPLE = "unreadable_sample"  # the sample's bytes could not be read from its shard
EMPTY_DOCUMENT = "empty_document"  # nothing usable left (no text and no image)
TOO_LONG = "too_long"  # longer than seq_length with data.overlong: skip
TIMEOUT = "timeout"  # not read and decoded within data.sample_timeout_s
UNEXPECTED = "unexpected_error"  # any other exception while building the document


class SampleError(Exception):
    """One sample is unusable; `reason` is one of the constants above."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class DataError(RuntimeError):
    """The data pipeline cannot go on (too many bad samples, no usable shards, ...)."""
