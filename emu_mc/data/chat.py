"""Chat data for instruction tuning (Emu-I): conversation records -> Conversation -> rendered pieces.

Records (LLaVA-Instruct and ShareGPT layouts; make_shards --format llava|sharegpt reads them from a
.json list or a .jsonl, the `json` member of a `chat` shard sample holds one):

    {"image": "a.jpg" | ["a.jpg", ...], "video": "c.mp4" | [...], "system": str,   (all optional)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "..."}]}

`messages` with {"role", "content"} may stand for `conversations` with {"from", "value"}. Roles:
human | user, gpt | assistant | chatgpt | bing | bard, and system (a first turn: the system message).
A first turn from the assistant is dropped and so is a last turn from the user (FastChat does the
same); the rest must alternate user, assistant. `<image>` / `<video>` markers in user turns place the
images / videos in order; media without markers go before the first user text (LLaVA's layout); a
sample with videos and no images may mark them with `<image>` (LLaVA-Video's layout).

Rendering (the release's template, `{system} [USER]: {text} [ASSISTANT]:`, inference.py):

    <s>{system} [USER]: {user 1} [ASSISTANT]: {answer 1}</s>[USER]: {user 2} [ASSISTANT]: {answer 2}</s>

With no `system` field the release's default for the sample's media is used (`default_system`). Only
the answers and the `</s>` that ends each are training targets (docs/chat_data.md).
"""
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from emu_mc.data.errors import BAD_JSON, MISSING_KEY, SampleError
from emu_mc.data.sources import IMAGE_EXTS, VIDEO_EXTS, Files, Image, Segment, Text, Video, _first, _json

BAD_ROLE = "bad_role"  # a role outside the known ones, turns that do not alternate, no exchange left
EMPTY_TURN = "empty_turn"  # a user or assistant turn with nothing in it
BAD_MARKERS = "bad_markers"  # <image> / <video> markers that do not match the sample's media

# The release's system messages (Emu1 inference.py: image_system_msg, video_system_msg).
IMAGE_SYSTEM = ("You will be presented with an image: [IMG]ImageContent[/IMG]. You will be able to see the image "
                "after I provide it to you. Please answer my questions based on the given image.")
VIDEO_SYSTEM = ("You are a helpful assistant and you will be presented with a video consisting of multiple "
                "chronological images: [IMG]ImageContent[/IMG]. You will be able to see the video after I "
                "provide it to you. Please answer my questions based on the given video.")
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bing", "bard")
_MARKER = re.compile(r"(<image>|<video>)")


@dataclass
class Exchange:
    user: List[Segment]  # Text / Image / Video in order
    answer: Optional[str]  # None: the open turn of a generation prompt


@dataclass
class Conversation:
    system: str
    exchanges: List[Exchange]


@dataclass
class Role:
    """A turn token: "user" -> [USER], "assistant" -> [ASSISTANT]."""

    name: str


@dataclass
class Answer:
    """An assistant reply: its tokens and the </s> after it are the training targets."""

    text: str


Piece = Union[Text, Image, Video, Role, Answer]


def default_system(num_images: int, num_videos: int) -> str:
    """The release's system message for a prompt's media: video -> VIDEO_SYSTEM, one image ->
    IMAGE_SYSTEM, none or several images (its interleaved example) -> ""."""
    if num_videos and not num_images:
        return VIDEO_SYSTEM
    return IMAGE_SYSTEM if num_images == 1 and not num_videos else ""


def turns_of(record: dict) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(system message from a system turn or None, [(role "user" | "assistant", text)]) of a record,
    the leading assistant turn and the trailing user turn dropped. SampleError bad_json / bad_role."""
    key, role_key, text_key = (("conversations", "from", "value") if "conversations" in record
                               else ("messages", "role", "content"))
    turns = record.get(key)
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise SampleError(MISSING_KEY if turns is None else BAD_JSON,
                          "needs `conversations` (or `messages`): a list of turn objects")
    system, out = None, []
    for i, turn in enumerate(turns):
        role, text = turn.get(role_key), turn.get(text_key)
        if not isinstance(text, str):
            raise SampleError(BAD_JSON, f"{key}[{i}].{text_key} must be a string, got {text!r}"[:200])
        if role == "system" and i == 0:
            system = text.strip()
        elif role in USER_ROLES or role in ASSISTANT_ROLES:
            out.append(("user" if role in USER_ROLES else "assistant", text))
        else:
            raise SampleError(BAD_ROLE, f"{key}[{i}].{role_key} {role!r} is not one of "
                                        f"{list(USER_ROLES + ASSISTANT_ROLES)} (or system first)")
    if out and out[0][0] == "assistant":
        out = out[1:]
    if out and out[-1][0] == "user":
        out = out[:-1]
    for i, (role, _) in enumerate(out):
        if role != ("user", "assistant")[i % 2]:
            raise SampleError(BAD_ROLE, "turns must alternate user, assistant, user, ...")
    if not out:
        raise SampleError(BAD_ROLE, "no user turn followed by an assistant turn")
    return system, out


def media_list(record: dict, name: str) -> List[str]:
    """record[name] as a list of paths: one string or a list of strings (absent: [])."""
    value = record.get(name, [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SampleError(BAD_JSON, f"`{name}` must be a path or a list of paths, got {value!r}"[:200])
    return value


def build_conversation(record: dict, images: Sequence[Image], videos: Sequence[Video]) -> Conversation:
    """A record (turns, optional system) and its media, in order -> Conversation. SampleError:
    bad_json, bad_role, empty_turn, bad_markers."""
    system, turns = turns_of(record)
    if system is None and "system" in record:
        if not isinstance(record["system"], str):
            raise SampleError(BAD_JSON, "`system` must be a string")
        system = record["system"].strip()
    marks = [m for role, text in turns if role == "user" for m in _MARKER.findall(text)]
    if videos and not images and "<video>" not in marks:
        places = {"<image>": list(videos), "<video>": []}  # LLaVA-Video: <image> marks the video
    else:
        places = {"<image>": list(images), "<video>": list(videos)}
    leading: List[Segment] = []
    for marker, queue in places.items():
        count = marks.count(marker)
        if not count:
            leading += queue
            queue.clear()
        elif count != len(queue):
            raise SampleError(BAD_MARKERS, f"{count} {marker} markers for {len(queue)} file(s) they stand for")
    exchanges = []
    for k in range(0, len(turns), 2):
        user_text, answer = turns[k][1].strip(), turns[k + 1][1].strip()
        if _MARKER.search(answer):
            raise SampleError(BAD_MARKERS, f"an image or video marker in assistant turn {k // 2}")
        if not answer:
            raise SampleError(EMPTY_TURN, f"assistant turn {k // 2} is empty")
        user: List[Segment] = list(leading) if k == 0 else []
        for i, piece in enumerate(_MARKER.split(user_text)):
            if i % 2:
                user.append(places[piece].pop(0))
            elif piece:
                user.append(Text(piece))
        if not user:
            raise SampleError(EMPTY_TURN, f"user turn {k // 2} is empty")
        exchanges.append(Exchange(user, answer))
    if system is None:
        system = default_system(len(images), len(videos))
    return Conversation(system, exchanges)


def parse_chat(files: Files) -> Conversation:
    """A `chat` shard sample: `json` (a record whose `images` / `videos` name the sample's members,
    e.g. "0.jpg", "video0.mp4"; absent: members {j}.jpg|png|... / video{j}.mp4|webm|... in order)."""
    if "json" not in files:
        raise SampleError(MISSING_KEY, f"no json member (has {sorted(files)})")
    record = _json(files)
    images = [Image(data, name) for name, data in _media(files, record, "images", "", IMAGE_EXTS)]
    videos = [Video(data, name) for name, data in _media(files, record, "videos", "video", VIDEO_EXTS)]
    return build_conversation(record, images, videos)


def _media(files: Files, record: dict, key: str, prefix: str, exts: Sequence[str]) -> List[Tuple[str, bytes]]:
    """[(member name, bytes)] of record[key], or of the members {prefix}0.ext, {prefix}1.ext, ..."""
    if key in record:
        names = media_list(record, key)
    else:
        names = []
        while True:
            name = _first(files, [f"{prefix}{len(names)}.{e}" for e in exts])
            if name is None:
                break
            names.append(name)
    missing = [n for n in names if n.lower() not in files]
    if missing:
        raise SampleError(MISSING_KEY, f"{key}: {missing[0]} is not in the sample (has {sorted(files)})")
    return [(n, files[n.lower()]) for n in names]


def render(conversation: Conversation, open_turn: bool = False) -> List[List[Piece]]:
    """The template's pieces, one list per exchange (the system message opens the first). With
    `open_turn` the last exchange stops after `[ASSISTANT]:` (a generation prompt)."""
    out = []
    for k, exchange in enumerate(conversation.exchanges):
        pieces: List[Piece] = [Text(conversation.system + " ")] if k == 0 and conversation.system else []
        pieces += [Role("user"), Text(": "), *exchange.user, Text(" "), Role("assistant"), Text(":")]
        if exchange.answer is not None:
            pieces.append(Answer(" " + exchange.answer))
        elif not (open_turn and k == len(conversation.exchanges) - 1):
            raise ValueError(f"exchange {k} has no answer")
        out.append(pieces)
    return out
