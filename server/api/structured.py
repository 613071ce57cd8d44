"""The structured-output parameters of a request (OpenAI, vLLM and TGI spellings) -> one Grammar.

OpenAI: `response_format` {type: json_object | json_schema}. vLLM: `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` (Lark), or `structured_outputs` {json | regex | choice | grammar |
json_object}. TGI: `parameters.grammar` {type: json | regex, value}. At most one may be set; a grammar
that does not compile is a 400 naming the field and the compiler's message.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.errors import APIError
from server.api.schemas import GenerateParameters, _OpenAISampling
from server.engine.grammar import Grammar, GrammarError


def _schema_text(schema: dict[str, Any] | str | bool, field: str) -> str:
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except json.JSONDecodeError as err:
            raise APIError(400, f"{field} is not valid JSON: {err}", param=field) from None
        return schema
    return json.dumps(schema)


def _vllm_spellings(prefix: str, json_spec, regex: str | None, choice: list[str] | None,
                    lark: str | None) -> list[tuple[str, Grammar]]:
    """vLLM's four constraints, named `<prefix>json`, `regex`, `choice` and `grammar`."""
    candidates = (
        ("json", json_spec, lambda field: Grammar("json_schema", _schema_text(json_spec, field))),
        ("regex", regex, lambda field: Grammar("regex", regex)),
        ("choice", choice, lambda field: Grammar("choice", json.dumps(choice))),
        ("grammar", lark, lambda field: Grammar("lark", lark)),
    )
    return [(prefix + name, make(prefix + name)) for name, value, make in candidates if value is not None]


def openai_grammar(body: _OpenAISampling) -> Grammar | None:
    """The grammar a completions or chat request asks for, validated; None without one."""
    found: list[tuple[str, Grammar]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", Grammar("json_object", "")))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        found.append(("response_format", Grammar("json_schema", _schema_text(fmt.json_schema.schema_,
                                                                              "response_format"))))
    found += _vllm_spellings("guided_", body.guided_json, body.guided_regex, body.guided_choice, body.guided_grammar)
    if (so := body.structured_outputs) is not None:
        found += _vllm_spellings("structured_outputs.", so.json_, so.regex, so.choice, so.grammar)
        if so.json_object:
            found.append(("structured_outputs.json_object", Grammar("json_object", "")))
    return _one(found)


def tgi_grammar(parameters: GenerateParameters) -> Grammar | None:
    grammar = parameters.grammar
    if grammar is None:
        return None
    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise APIError(400, "grammar of type regex needs a string value", param="grammar")
        return _one([("grammar", Grammar("regex", grammar.value))])
    if grammar.type == "json_object" or grammar.value is None:
        return _one([("grammar", Grammar("json_object", ""))])
    return _one([("grammar", Grammar("json_schema", _schema_text(grammar.value, "grammar")))])


def _one(found: list[tuple[str, Grammar]]) -> Grammar | None:
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"only one structured output constraint may be set, got {names}", param=found[1][0])
    field, grammar = found[0]
    try:
        grammar.validate()
    except GrammarError as err:
        raise APIError(400, f"{field}: the grammar does not compile: {err}", param=field) from None
    return grammar
