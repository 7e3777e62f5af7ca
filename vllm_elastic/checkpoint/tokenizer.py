"""A tiny deterministic word-level tokenizer for random test and demo checkpoints.

It is built locally with the ``tokenizers`` library (no download): a WordLevel model over
about 250 common lowercase English words, the digits ``0``-``9`` and the punctuation
``. , ? !``, split by the Whitespace pre-tokenizer (``\\w+|[^\\w\\s]+``). Words outside the
vocabulary become ``<unk>``. No BOS is prepended, so a prompt tokenizes to exactly its
words. Decoding joins tokens with single spaces (``"hello , world ."``), which is also what
incremental (streaming) detokenization produces.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

THINK_START = "<think>"
THINK_END = "</think>"

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"

# Order fixes the ids: <unk>=0, <pad>=1, <s>=2, </s>=3, <think>=4, </think>=5, ...
SPECIAL_TOKENS: tuple[str, ...] = (
    UNK,
    PAD,
    BOS,
    EOS,
    THINK_START,
    THINK_END,
    USER,
    ASSISTANT,
    SYSTEM,
)

_WORDS = """
hello hi please thanks yes no okay
the of and to a in is it you that he was for on are with as i his they be at one have
this from or had by hot word but what some we can out other were all there when up use
your how said an each she which do their time if will way about many then them write
would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round
man year came show every good me give our under name very through just form sentence
great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large
spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother near build self earth father
head stand own page should country found answer school grow study still learn plant cover
food sun four between state keep eye never last let thought city tree cross farm hard
start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book
carry took science eat room friend began idea fish mountain stop once base hear horse cut
sure watch color face wood main enough plain girl usual young ready above ever red list
though feel talk bird soon body dog family direct pose leave song measure door product
black short numeral class wind question happen complete ship area half rock order fire
south problem piece told knew pass since top whole king space heard best hour better true
during hundred five remember step early hold west ground interest reach fast verb sing
listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold
notice voice unit power town fine certain fly fall lead cry dark machine note wait plan
figure star box noun field rest correct able pound done beauty drive stood contain front
teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force
blue object decide surface deep moon island foot system busy test record boat common gold
possible plane stead dry wonder laugh thousand ago ran check game shape equate miss
brought heat snow tire bring yes distant fill east paint language among
"""

# About 250 words: the first ones of the list above (deduplicated, order kept).
NUM_WORDS = 250
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
PUNCTUATION: tuple[str, ...] = (".", ",", "?", "!")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> <think>{% endif %}"
)


def vocabulary_words() -> list[str]:
    """The plain (non-special) vocabulary in id order: words, then digits, then punctuation."""
    words = list(dict.fromkeys(_WORDS.split()))[:NUM_WORDS]
    return words + list(DIGITS) + list(PUNCTUATION)


def _build_backend() -> Tokenizer:
    """The ``tokenizers`` object: WordLevel + Whitespace, specials never split."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary_words():
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # No decoder: tokenizers then joins tokens with single spaces, which is what we want.
    backend.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS]
    )
    return backend


def tokenizer_vocab_size() -> int:
    """``len(tokenizer)`` of the tokenizer build_tokenizer writes (specials included)."""
    return len(SPECIAL_TOKENS) + len(vocabulary_words())


def special_token_ids() -> dict[str, int]:
    """Ids of the bos / eos / pad / unk tokens of the tokenizer build_tokenizer writes."""
    return {
        "bos": SPECIAL_TOKENS.index(BOS),
        "eos": SPECIAL_TOKENS.index(EOS),
        "pad": SPECIAL_TOKENS.index(PAD),
        "unk": SPECIAL_TOKENS.index(UNK),
    }


def build_tokenizer(out_dir: Path) -> None:
    """Write the tokenizer (tokenizer.json, tokenizer_config.json, ...) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[THINK_START, THINK_END, USER, ASSISTANT, SYSTEM],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    # Keep the chat template inside tokenizer_config.json (not chat_template.jinja).
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _make_portable(out_dir, tokenizer.special_tokens_map)


def _make_portable(out_dir: Path, special_tokens_map: dict[str, object]) -> None:
    """Let transformers 4.x load the files too: name the generic fast-tokenizer class and
    write the legacy ``special_tokens_map.json`` (transformers 5 no longer does)."""
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", [])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    specials = dict(special_tokens_map)
    specials["additional_special_tokens"] = [THINK_START, THINK_END, USER, ASSISTANT, SYSTEM]
    specials.pop("extra_special_tokens", None)
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(specials, indent=2, sort_keys=True) + "\n"
    )
