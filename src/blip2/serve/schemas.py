"""Request bodies (OpenAI-style chat, caption, ITM), image inputs and the chat prompt.

Validation is pydantic's (the server turns its errors into 400s). Unknown fields are ignored, as OpenAI
clients send many. Differences from OpenAI's chat API: `temperature` defaults to 0 (greedy: BLIP-2 answers are
short and greedy is what the papers evaluate); `top_k` and `num_beams` are extensions; `seed` makes sampling
reproducible, alone or batched.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Annotated, Literal, Union

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from .engine import Decoding, RequestError, ServeSettings


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str  # OpenAI sends {"url": ...}; a bare string is accepted too


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part] | None = None


class Sampling(_Body):
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, le=2**31 - 1)  # extension; 0: off
    n: int = Field(1, ge=1)
    num_beams: int = Field(1, ge=1, le=16)  # extension; beams are not streamed token by token
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    def decoding(self) -> Decoding:
        sample = self.temperature > 0
        return Decoding(do_sample=sample, temperature=self.temperature if sample else 1.0,
                        top_p=self.top_p if sample else 1.0, top_k=self.top_k if sample else 0,
                        num_beams=self.num_beams, n=self.n)

    def new_tokens(self, settings: ServeSettings) -> int:
        value = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return min(settings.default_max_tokens, settings.max_tokens) if value is None else value


class StreamOptions(_Body):
    include_usage: bool = False  # OpenAI's: a last chunk with no choices and the token counts


class ChatRequest(Sampling):
    model: str | None = None  # accepted and ignored: the server holds one model
    messages: list[Message] = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None


class CaptionRequest(Sampling):
    image: str  # a data: URL (or a local path, when the server allows them)
    prompt: str | None = None  # BLIP-2: text the caption continues, e.g. "a photo of"


class ItmRequest(_Body):
    image: str
    texts: list[str] = Field(min_length=1)


# ------------------------------------------------------------------------------------------------- chat


def chat_inputs(messages: list[Message], template: str) -> tuple[str, str]:
    """(image URL, LLM prompt) from chat messages: exactly one image (in a user message); the text turns are
    joined into one prompt, each user turn through `template` ("{}" = the text), assistant turns as they are
    (BLIP-2's multi-turn prompting: "Question: q1 Short answer: a1 Question: q2 Short answer:"). The prompt is
    "" when there is no text at all: the model then captions the image."""
    images, pieces = [], []
    for i, m in enumerate(messages):
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        texts = []
        for part in parts:
            if isinstance(part, ImagePart):
                if m.role != "user":
                    raise RequestError(f"messages.{i}: images can only be sent in user messages")
                images.append(part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url)
            elif part.text.strip():
                texts.append(part.text.strip())
        text = " ".join(texts)
        if text:
            pieces.append(template.replace("{}", text, 1) if m.role == "user" else text)
    if messages[-1].role != "user":
        raise RequestError("the last message must come from the user")
    if len(images) != 1:
        raise RequestError(f"send exactly one image (an image_url part in a user message), got {len(images)}")
    return images[0], " ".join(pieces)


# ----------------------------------------------------------------------------------------------- images

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def load_image(url: str, settings: ServeSettings):
    """A decoded PIL image (EXIF orientation applied) from a data: URL, or from a local file when the server has
    an image root. Remote URLs are never fetched. Refuses images above `max_image_pixels` before decoding them."""
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError("an image data URL must be base64: data:image/png;base64,...")
        try:
            source = io.BytesIO(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError("the image data URL is not valid base64") from None
    elif _SCHEME.match(url) and not url.startswith("file:") and not re.match(r"^[A-Za-z]:[\\/]", url):
        raise RequestError("remote image URLs are not fetched: send the image inline as a data: URL",
                           code="remote_image")
    else:
        source = _local_file(url, settings.image_root)
    try:
        img = Image.open(source)
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, DecompressionBombError, OSError, ...
        raise RequestError(f"cannot decode the image ({type(e).__name__})") from None
    w, h = img.size
    if w * h > settings.max_image_pixels:
        raise RequestError(f"the image has {w}x{h} = {w * h} pixels, more than the limit of "
                           f"{settings.max_image_pixels}", status=413, code="image_too_large")
    try:
        return ImageOps.exif_transpose(img)  # decodes the pixels: a truncated file fails here, not in a batch
    except Exception as e:  # noqa: BLE001
        raise RequestError(f"cannot decode the image ({type(e).__name__})") from None


def _local_file(url: str, root: str | None) -> Path:
    if root is None:
        raise RequestError("local image paths are not enabled on this server (start it with --image-root DIR); "
                           "send the image as a data: URL", status=403, code="local_images_disabled")
    name = url[len("file://"):] if url.startswith("file://") else url
    try:
        base = Path(root).resolve()
        path = (base / name).resolve()  # relative names are relative to the root; absolute ones must lie in it
    except (OSError, ValueError):
        raise RequestError("invalid image path") from None
    if not path.is_relative_to(base):
        raise RequestError("the image path lies outside the server's image root", status=403,
                           code="path_not_allowed")
    if not path.is_file():
        raise RequestError("image file not found under the server's image root", code="image_not_found")
    return path
