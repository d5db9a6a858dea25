"""`hylo serve`'s server-only flags that need reading or checking at start (before the model loads), each refused
with an error that names the flag: --chat-template, --lora-modules, --ssl-keyfile / --ssl-certfile."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_MARKS = "{}\n"  # a --chat-template value holding one of these is a template, not a path (as vLLM decides)


def load_chat_template(value: str) -> str:
    """--chat-template: the contents of a file, or the template itself; checked to parse as Jinja."""
    try:
        is_file = Path(value).is_file()
    except OSError:  # a long inline template is not a valid file name
        is_file = False
    if is_file:
        try:
            template = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {value}: the file cannot be read as UTF-8 text ({e})") from None
    elif any(mark in value for mark in TEMPLATE_MARKS):
        template = value
    else:
        raise ValueError(f"--chat-template {value}: no such file; give a template file, or the template itself (Jinja, with {{ }})")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"--chat-template: not a valid Jinja template: {e.message} (line {e.lineno})") from None
    return template


@dataclass
class LoRAModule:
    name: str
    path: str
    base_model_name: str | None = None


LORA_MODULE_KEYS = ("name", "path", "base_model_name")


def parse_lora_module(text: str) -> LoRAModule:
    """One --lora-modules item: NAME=PATH, or vLLM's JSON form {"name": ..., "path": ..., "base_model_name": ...}."""
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-modules {text}: not valid JSON ({e}); write NAME=PATH or "
                             '{"name": "NAME", "path": "PATH", "base_model_name": "MODEL"}') from None
        if not isinstance(raw, dict):
            raise ValueError(f"--lora-modules {text}: a JSON item must be an object")
        unknown = sorted(set(raw) - set(LORA_MODULE_KEYS))
        if unknown:
            raise ValueError(f"--lora-modules {text}: unknown key {unknown[0]!r}; the keys are {', '.join(LORA_MODULE_KEYS)}")
        for key in LORA_MODULE_KEYS:
            required = key != "base_model_name"
            if (required and key not in raw) or (key in raw and not (isinstance(raw[key], str) and raw[key])):
                raise ValueError(f"--lora-modules {text}: {key!r} must be a non-empty string")
        return LoRAModule(raw["name"], raw["path"], raw.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules {text}: write NAME=PATH, or the JSON form " + '{"name": "NAME", "path": "PATH"}')
    return LoRAModule(name, path)


def check_ssl_files(keyfile: str | None, certfile: str | None) -> None:
    """Both files load as a certificate chain (a certfile may hold the key too, so it may come alone)."""
    if keyfile and not certfile:
        raise ValueError("--ssl-keyfile needs --ssl-certfile (the certificate that goes with the key)")
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if certfile:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"--ssl-certfile {certfile}" + (f" / --ssl-keyfile {keyfile}" if keyfile else "")
                             + f": not a certificate and its private key ({e}); give PEM files that belong together") from None
