"""A chat template that writes Qwen3.5's format for thinking and tools (written from the format, no download),
and the embedded demo checkpoint with it, for the reasoning and tool-calling tests.

With `chat_template_kwargs: {"echo_prompt": true}` the template raises with the prompt it rendered, so a test
can read exactly what reached it through the server's 400 ("the chat template rejected these messages: ...").
"""

from __future__ import annotations

import shutil
from pathlib import Path

ECHO = "RENDERED:"

QWEN3_5_TEMPLATE = r"""
{%- macro text(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content is iterable and content is not mapping -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}
{%- elif content is not none -%}{{- content | string -}}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- set prompt -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if messages[0].role == 'system' -%}{{- text(messages[0].content) + '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou have access to the following functions:\n\n<tools>' -}}
{%- for tool in tools -%}
{%- set f = tool.function if tool.function is defined else tool -%}
{{- '\n<function>\n<name>' + f.name + '</name>' -}}
{%- if f.description is defined and f.description -%}{{- '\n<description>' + f.description + '</description>' -}}{%- endif -%}
{{- '\n<parameters>' + (f.parameters | default({}) | tojson) + '</parameters>\n</function>' -}}
{%- endfor -%}
{{- '\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call><|im_end|>\n' -}}
{%- elif messages[0].role == 'system' -%}
{{- '<|im_start|>system\n' + text(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
{%- if not loop.first -%}{{- raise_exception('the system message must come first') -}}{%- endif -%}
{%- elif m.role == 'user' -%}
{{- '<|im_start|>user\n' + text(m.content) + '<|im_end|>\n' -}}
{%- elif m.role == 'assistant' -%}
{%- set content = text(m.content) -%}
{{- '<|im_start|>assistant\n' -}}
{%- if m.reasoning_content is defined and m.reasoning_content is string and loop.index0 > ns.last_query -%}
{{- '<think>\n' + m.reasoning_content.strip('\n') + '\n</think>\n\n' -}}
{%- endif -%}
{{- content.lstrip('\n') -}}
{%- if m.tool_calls is defined and m.tool_calls -%}
{%- for call in m.tool_calls -%}
{%- set f = call.function if call.function is defined else call -%}
{%- if loop.first -%}{{- ('\n\n' if content | trim else '') + '<tool_call>\n<function=' + f.name + '>\n' -}}
{%- else -%}{{- '\n<tool_call>\n<function=' + f.name + '>\n' -}}{%- endif -%}
{%- for name, value in (f.arguments | default({})) | items -%}
{{- '<parameter=' + name + '>\n' -}}
{%- if value is mapping or (value is sequence and value is not string) -%}{{- value | tojson -}}{%- else -%}{{- value | string -}}{%- endif -%}
{{- '\n</parameter>\n' -}}
{%- endfor -%}
{{- '</function>\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif m.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + text(m.content) + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- else -%}{{- '<think>\n' -}}{%- endif -%}
{%- endif -%}
{%- endset -%}
{%- if echo_prompt is defined and echo_prompt -%}{{- raise_exception('RENDERED:' + prompt) -}}{%- endif -%}
{{- prompt -}}
""".strip()


def qwen3_5_demo(folder: Path) -> str:
    """The embedded demo checkpoint, copied into `folder` with QWEN3_5_TEMPLATE as its chat template."""
    from hylo.demo import BASE_DIR

    target = Path(folder) / "qwen3_5-demo"
    shutil.copytree(BASE_DIR, target)
    (target / "chat_template.jinja").write_text(QWEN3_5_TEMPLATE)
    return str(target)
