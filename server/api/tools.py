"""Tool calling for chat: the tools go to the model's chat template; the answer is parsed into `tool_calls`.

`tool_choice`:
- "none": the tools are not offered (not rendered) and nothing is parsed;
- "auto" (the default with tools): free generation, then calls are parsed out of the text;
- "required": a grammar forces a JSON list of one or more calls, each {"name": <a tool>, "arguments":
  <that tool's parameters schema>} (as vLLM does);
- {"type": "function", "function": {"name": N}}: a grammar forces the arguments of N (its parameters
  schema); the call is N with them.

Parsing ("auto") accepts the forms the common templates teach: Hermes / Qwen `<tool_call>{...}</tool_call>`
blocks, and a bare JSON object or list of objects with `name` and `arguments` (or `parameters`, Llama 3's
spelling). Text outside `<tool_call>` blocks stays the message content. A response with calls finishes
with "tool_calls" (a named function: "stop", as OpenAI). Streaming requests with tools get the whole
message in one chunk at the end: whether the text is a call is only known then.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from server.api.errors import APIError
from server.engine.grammar import Grammar

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def tools_offered(tools: list[dict[str, Any]] | None, tool_choice) -> list[dict[str, Any]] | None:
    """The tools to render into the prompt (None: none, or tool_choice "none")."""
    if not tools or tool_choice == "none":
        return None
    return tools


def _function(tool: dict[str, Any], index: int) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if tool.get("type", "function") != "function" or not isinstance(function, dict) \
            or not isinstance(function.get("name"), str) or not function["name"]:
        raise APIError(400, f"tools[{index}] must be {{type: function, function: {{name, parameters}}}}",
                       param=f"tools[{index}]")
    return function


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters")
    return parameters if isinstance(parameters, dict) and parameters else {"type": "object"}


def check_tools(tools: list[dict[str, Any]] | None, tool_choice) -> None:
    """400 naming the problem: malformed tools, or a tool_choice that names no tool."""
    functions = [_function(tool, i) for i, tool in enumerate(tools or [])]
    if tool_choice in (None, "none", "auto"):
        return
    if not functions:
        raise APIError(400, f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
    if tool_choice == "required":
        return
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if name not in {f["name"] for f in functions}:
        raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools",
                       param="tool_choice")


def tool_grammar(tools: list[dict[str, Any]] | None, tool_choice, parallel: bool | None = None) -> Grammar | None:
    """The grammar that enforces "required" and named tool choices (one call when `parallel` is False);
    None otherwise."""
    functions = [_function(tool, i) for i, tool in enumerate(tools or [])]
    if tool_choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": _parameters(f)},
                  "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if parallel is False:
            schema["maxItems"] = 1
        return Grammar("json_schema", json.dumps(schema))
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        function = next(f for f in functions if f["name"] == name)
        return Grammar("json_schema", json.dumps(_parameters(function)))
    return None


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": text}}


def _calls_in(value: Any) -> list[dict[str, Any]] | None:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append(_call(item["name"], item.get("arguments", item.get("parameters", {}))))
    return calls or None


def parse_tool_calls(text: str, tool_choice) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a generated message under `tool_choice` (not "none"). Text that is not a
    complete call (max_tokens cut it) stays content, with no calls."""
    if isinstance(tool_choice, dict):
        return None, [_call(tool_choice["function"]["name"], text)]
    if tool_choice == "required":
        try:
            return None, _calls_in(json.loads(text)) or []
        except json.JSONDecodeError:  # cut by max_tokens before the grammar closed the list
            return text, []
    blocks = _TOOL_CALL_BLOCK.findall(text)
    if blocks:
        calls = []
        for block in blocks:
            try:
                calls += _calls_in(json.loads(block)) or []
            except json.JSONDecodeError:
                return text, []  # a malformed call is left as text, as vLLM's parsers do
        content = _TOOL_CALL_BLOCK.sub("", text).strip()
        return content or None, calls
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            calls = _calls_in(json.loads(stripped))
        except json.JSONDecodeError:
            calls = None
        if calls:
            return None, calls
    return text, []


def finish_reason(tool_choice, calls: list[dict[str, Any]], reason: str | None) -> str | None:
    if not calls:
        return reason
    return "stop" if isinstance(tool_choice, dict) else "tool_calls"
