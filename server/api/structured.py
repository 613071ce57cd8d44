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
from server.api.schemas import GenerateParameters, StructuredOutputs, _OpenAISampling
from server.engine.grammar import Grammar, GrammarError


def _schema_text(schema: dict[str, Any] | str | bool, field: str) -> str:
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except json.JSONDecodeError as err:
            raise APIError(400, f"{field} is not valid JSON: {err}", param=field) from None
        return schema
    return json.dumps(schema)


def _from_structured_outputs(so: StructuredOutputs) -> list[tuple[str, Grammar]]:
    found = []
    if so.json_ is not None:
        schema = _schema_text(so.json_, "structured_outputs.json")
        found.append(("structured_outputs.json", Grammar("json_schema", schema)))
    if so.regex is not None:
        found.append(("structured_outputs.regex", Grammar("regex", so.regex)))
    if so.choice is not None:
        found.append(("structured_outputs.choice", Grammar("choice", json.dumps(so.choice))))
    if so.grammar is not None:
        found.append(("structured_outputs.grammar", Grammar("lark", so.grammar)))
    if so.json_object:
        found.append(("structured_outputs.json_object", Grammar("json_object", "")))
    return found


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
    if body.guided_json is not None:
        found.append(("guided_json", Grammar("json_schema", _schema_text(body.guided_json, "guided_json"))))
    if body.guided_regex is not None:
        found.append(("guided_regex", Grammar("regex", body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", Grammar("choice", json.dumps(body.guided_choice))))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", Grammar("lark", body.guided_grammar)))
    if body.structured_outputs is not None:
        found += _from_structured_outputs(body.structured_outputs)
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
