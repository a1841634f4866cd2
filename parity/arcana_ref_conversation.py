"""The release's conversation templates and prompt helpers, re-implemented for fixture generation.

CI cannot import the release, so `conversation_fixtures.py` builds its expected prompts from this module.
It follows `arcana/conversation.py`, `arcana/mm_utils.py` and `arcana/serve/cli.py` of the release,
including their failures: where the release raises, `PromptError.release_exception` names what it raises.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"

SINGLE, TWO, MPT, PLAIN, LLAMA_2 = "single", "two", "mpt", "plain", "llama_2"


class PromptError(Exception):
    def __init__(self, release_exception: str, message: str):
        super().__init__(message)
        self.release_exception = release_exception


@dataclass(frozen=True)
class Message:
    role: str
    text: Optional[str]  # None is the slot the model is about to fill
    image: bool = False  # the web UI's (text, image, mode) form; the CLI writes "<image>\n" into text


@dataclass(frozen=True)
class Template:
    system: str
    roles: Tuple[str, str]
    style: str
    sep: str
    sep2: Optional[str] = None
    version: str = "Unknown"
    preset: Tuple[Message, ...] = ()  # messages shipped inside the template (only vicuna_v0 has any)

    def stop_string(self) -> Optional[str]:
        # serve/cli.py: sep, except sep2 for the TWO style
        return self.sep2 if self.style == TWO else self.sep


_HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_USER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_MMTAG_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant is able to understand the visual content that the user provides, and assist "
                 "the user with a variety of tasks using natural language."
                 "The visual content will be provided with the following format: <Image>visual content</Image>.")
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.")
_LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                         "content that the user provides, and assist the user with a variety of tasks using "
                         "natural language.")
_VICUNA_V0_EXAMPLE = (
    Message("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    Message("Assistant",
            "Renewable energy sources are those that can be replenished naturally in a relatively short amount of "
            "time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other "
            "hand, are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key "
            "differences between renewable and non-renewable energy sources:\n"
            "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy "
            "sources are finite and will eventually run out.\n"
            "2. Environmental impact: Renewable energy sources have a much lower environmental impact than "
            "non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, and other "
            "negative effects.\n"
            "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have "
            "lower operational costs than non-renewable sources.\n"
            "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
            "locations than non-renewable sources.\n"
            "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
            "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
            "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
            "non-renewable sources are not, and their depletion can lead to economic and social instability.\n"),
)
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

_VICUNA_V0 = Template(_HUMAN_SYSTEM, ("Human", "Assistant"), SINGLE, "###", preset=_VICUNA_V0_EXAMPLE)
_VICUNA_V1 = Template(_USER_SYSTEM, ("USER", "ASSISTANT"), TWO, " ", "</s>", "v1")
_CHATML_DIRECT = Template("<|im_start|>system\nAnswer the questions.", _CHATML_ROLES, MPT, "<|im_end|>",
                          version="mpt")
_PLAIN = Template("", ("", ""), PLAIN, "\n")

TEMPLATES = {
    "default": _VICUNA_V0,
    "v0": _VICUNA_V0,
    "v1": _VICUNA_V1,
    "vicuna_v1": _VICUNA_V1,
    "llama_2": Template(_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), LLAMA_2, "<s>", "</s>", "llama_v2"),
    "mistral_instruct": Template("", ("USER", "ASSISTANT"), LLAMA_2, "", "</s>", "llama_v2"),
    "chatml_direct": _CHATML_DIRECT,
    "mistral_direct": _CHATML_DIRECT,
    "plain": _PLAIN,
    "v0_plain": _PLAIN,
    "llava_v0": Template(_HUMAN_SYSTEM, ("Human", "Assistant"), SINGLE, "###"),
    "v0_mmtag": Template(_MMTAG_SYSTEM, ("Human", "Assistant"), SINGLE, "###", version="v0_mmtag"),
    "llava_v1": Template(_HUMAN_SYSTEM, ("USER", "ASSISTANT"), TWO, " ", "</s>", "v1"),
    "v1_mmtag": Template(_MMTAG_SYSTEM, ("USER", "ASSISTANT"), TWO, " ", "</s>", "v1_mmtag"),
    "llava_llama_2": Template(_LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), LLAMA_2, "<s>", "</s>", "llama_v2"),
    "mpt": Template("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
                    "The assistant gives helpful and honest answers.", _CHATML_ROLES, MPT, "<|im_end|>",
                    version="mpt"),
}


def _concat(*parts: Optional[str]) -> str:
    # The release concatenates with `+`; a None separator (sep2 of plain) makes it raise TypeError.
    if any(p is None for p in parts):
        raise PromptError("TypeError", "a separator the template needs is None")
    return "".join(parts)


def _spliced(template: Template, messages: Sequence[Message]) -> List[Tuple[str, Optional[str]]]:
    """(role, text) pairs as the renderers see them; text None marks a message the release skips as falsy."""
    pairs: List[Tuple[str, Optional[str]]] = []
    for m in messages:
        if m.image:
            pairs.append((m.role, m.text or ""))  # a (text, image, mode) tuple is truthy even with empty text
        else:
            pairs.append((m.role, m.text if m.text else None))
    if messages and messages[0].image:
        bare = (messages[0].text or "").replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if "mmtag" in template.version:
            pairs[0] = (messages[0].role, bare or None)
            pairs[0:0] = [(template.roles[0], "<Image><image></Image>"), (template.roles[1], "Received.")]
        else:
            pairs[0] = (messages[0].role, DEFAULT_IMAGE_TOKEN + "\n" + bare)
    return pairs


def _lstrip_chars(text: str, chars: str) -> str:
    i = 0
    while i < len(text) and text[i] in chars:
        i += 1
    return text[i:]


def render_prompt(template: Template, messages: Sequence[Message]) -> str:
    """What the release's `get_prompt()` returns for the template holding `preset + messages`."""
    pairs = _spliced(template, list(template.preset) + list(messages))
    if template.style == SINGLE:
        out = template.system + template.sep
        for role, text in pairs:
            out += _concat(role, ": ", text, template.sep) if text is not None else role + ":"
    elif template.style == TWO:
        out = template.system + template.sep
        for i, (role, text) in enumerate(pairs):
            sep = template.sep if i % 2 == 0 else template.sep2
            out += _concat(role, ": ", text, sep) if text is not None else role + ":"
    elif template.style == MPT:
        out = template.system + template.sep
        for role, text in pairs:
            out += _concat(role, text, template.sep) if text is not None else role
    elif template.style == PLAIN:
        out = template.system
        for i, (_, text) in enumerate(pairs):
            if text is not None:
                out += _concat(text, template.sep if i % 2 == 0 else template.sep2)
    elif template.style == LLAMA_2:
        out = _render_llama_2(template, pairs)
    else:
        raise PromptError("ValueError", f"unknown style {template.style}")
    return out


def _render_llama_2(template: Template, pairs: List[Tuple[str, Optional[str]]]) -> str:
    out = ""
    for i, (role, text) in enumerate(pairs):
        if i == 0 and text is None:
            raise PromptError("AssertionError", "the first message must have text")
        if i == 0 and role != template.roles[0]:
            raise PromptError("AssertionError", "the first message must come from the user")
        if text is None:
            continue
        if i == 0 and template.system:
            text = f"<<SYS>>\n{template.system}\n<</SYS>>\n\n" + text
        if i % 2 == 0:
            out += template.sep + f"[INST] {text} [/INST]"
        else:
            out += _concat(" ", text, " ", template.sep2)
    return _lstrip_chars(out, template.sep)  # the release's str.lstrip takes a set of characters


def template_for_model_name(model_name: str) -> str:
    """serve/cli.py's choice of template from the model's name (first match wins)."""
    name = model_name.lower()
    for needle, template in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"),
                             ("v1.6-34b", "chatml_direct"), ("v1", "llava_v1"), ("mpt", "mpt")):
        if needle in name:
            return template
    return "llava_v0"


def model_name_from_path(model_path: str) -> str:
    """mm_utils.get_model_name_from_path."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-"):
        if len(parts) < 2:
            raise PromptError("IndexError", "a checkpoint folder needs a parent folder")
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def cli_user_message(text: str, with_image: bool, mm_use_im_start_end: bool) -> str:
    """serve/cli.py: the image goes in front of the first user message only."""
    if not with_image:
        return text
    marker = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if mm_use_im_start_end \
        else DEFAULT_IMAGE_TOKEN
    return marker + "\n" + text


def splice_image_tokens(chunk_ids: Sequence[Sequence[int]], bos_id: int,
                        image_token_index: int = IMAGE_TOKEN_INDEX) -> List[int]:
    """mm_utils.tokenizer_image_token given the ids of each `<image>`-separated chunk."""
    drop = 1 if chunk_ids and chunk_ids[0] and chunk_ids[0][0] == bos_id else 0
    ids: List[int] = [bos_id] if drop else []
    for k, chunk in enumerate(chunk_ids):
        if k > 0:
            # The release's separator is `drop + 1` copies sliced by `drop`: always one image index.
            ids.append(image_token_index)
        ids.extend(chunk[drop:])  # every chunk loses its first id when the first chunk began with BOS
    return ids
