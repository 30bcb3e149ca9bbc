//! Tool calling on `/v1/chat/completions`: the request's `tools`,
//! `tool_choice` and `parallel_tool_calls` checked and turned into engine
//! work, and the engine's parsed calls turned into OpenAI's `tool_calls`.
//!
//! The chat template renders the tools into the prompt, and the vendored
//! engine parses the answer for calls in the model's format (Qwen's and
//! Hermes' `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, among
//! others) and ends the choice with `finish_reason: "tool_calls"`. `auto`
//! leaves the model free to call or to answer; `required` and a named
//! function constrain decoding with a grammar, so the answer is one (or,
//! with `parallel_tool_calls`, several) `<tool_call>` blocks whose JSON names
//! a declared function with arguments valid against its schema. A model
//! whose template does not render tools answers 400 naming `tools` rather
//! than a plain answer that ignores them.

use std::collections::HashMap;

use mistralrs::{Constraint, Function, Tool, ToolCallResponse, ToolChoice, ToolType};
use serde_json::Value;

use crate::error::ApiError;
use crate::protocol::{FunctionCall, ToolCall, ToolChoiceInput, ToolDefinition};

/// What the request asks of tools, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// Tools are shown to the model; its answer is not read for calls.
    None,
    /// The model calls a tool or answers.
    Auto,
    /// The answer is one or more calls (`parallel`: more than one allowed).
    Required { parallel: bool },
    /// The answer is a call of this function.
    Named(String),
}

/// The tools of a request and what it asks of them.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    pub tools: Vec<Tool>,
    pub mode: ToolMode,
}

/// Where a request keeps a tool's function fields, so that an error names
/// the field as the client sent it: chat nests them under `function`
/// (`tools[0].function.name`), Responses puts them beside `type`
/// (`tools[0].name`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ToolLayout {
    Chat,
    Responses,
}

impl ToolLayout {
    fn function_field(self, i: usize, field: &str) -> String {
        match self {
            ToolLayout::Chat => format!("tools[{i}].function.{field}"),
            ToolLayout::Responses => format!("tools[{i}].{field}"),
        }
    }
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`. `None` when the
/// request has no tools (an empty list is none).
pub fn validate(
    tools: Option<Vec<ToolDefinition>>,
    choice: Option<ToolChoiceInput>,
    parallel: Option<bool>,
    layout: ToolLayout,
) -> Result<Option<ToolRequest>, ApiError> {
    let tools = tools.unwrap_or_default();
    if tools.is_empty() {
        return match choice {
            Some(ToolChoiceInput::Mode(m)) if m == "none" => Ok(None),
            Some(_) => Err(ApiError::invalid_param("tool_choice", "`tool_choice` needs `tools`.")),
            None => Ok(None),
        };
    }
    let mut names = Vec::with_capacity(tools.len());
    let mut engine_tools = Vec::with_capacity(tools.len());
    for (i, tool) in tools.into_iter().enumerate() {
        let param = |field: &str| layout.function_field(i, field);
        if tool.kind != "function" {
            return Err(ApiError::invalid_param(&format!("tools[{i}].type"), "Only `function` tools are supported."));
        }
        let f = tool.function;
        let valid_name = !f.name.is_empty()
            && f.name.len() <= 64
            && f.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(ApiError::invalid_param(
                &param("name"),
                "A function name is 1 to 64 letters, digits, `_` or `-`.",
            ));
        }
        if names.contains(&f.name) {
            return Err(ApiError::invalid_param(&param("name"), format!("`{}` is declared twice.", f.name)));
        }
        let parameters = match f.parameters {
            None => None,
            Some(Value::Object(map)) => Some(map.into_iter().collect::<HashMap<_, _>>()),
            Some(_) => {
                return Err(ApiError::invalid_param(
                    &param("parameters"),
                    "`parameters` is a JSON schema object.",
                ))
            }
        };
        names.push(f.name.clone());
        engine_tools.push(Tool {
            tp: ToolType::Function,
            function: Function { description: f.description, name: f.name, parameters },
        });
    }
    let mode = match choice {
        None => ToolMode::Auto,
        Some(ToolChoiceInput::Mode(m)) => match m.as_str() {
            "none" => ToolMode::None,
            "auto" => ToolMode::Auto,
            "required" => ToolMode::Required { parallel: parallel.unwrap_or(true) },
            other => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("`{other}` is not a tool choice; use none, auto, required or a function."),
                ))
            }
        },
        Some(ToolChoiceInput::Named(named)) => {
            if named.kind != "function" || !names.contains(&named.function.name) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("`tool_choice` names `{}`, which is not among `tools`.", named.function.name),
                ));
            }
            ToolMode::Named(named.function.name)
        }
    };
    Ok(Some(ToolRequest { tools: engine_tools, mode }))
}

/// Whether a chat template renders tools (it reads a `tools` variable), and
/// whether it calls them in the `<tool_call>` format the constrained modes
/// decode to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TemplateSupport {
    pub renders_tools: bool,
    pub tool_call_tags: bool,
}

impl TemplateSupport {
    pub fn of(template: Option<&str>) -> Self {
        let t = template.unwrap_or_default();
        Self {
            renders_tools: t.contains("tools"),
            tool_call_tags: t.contains("<tool_call>"),
        }
    }

    /// Refuses what this model's template cannot do.
    pub fn check(self, model: &str, mode: &ToolMode) -> Result<(), ApiError> {
        if !self.renders_tools {
            return Err(ApiError::invalid_param(
                "tools",
                format!("The chat template of model `{model}` does not render tools: it cannot be given `tools`."),
            ));
        }
        let constrained = matches!(mode, ToolMode::Required { .. } | ToolMode::Named(_));
        if constrained && !self.tool_call_tags {
            return Err(ApiError::invalid_param(
                "tool_choice",
                format!(
                    "`required` and named tool choices are decoded to `<tool_call>` blocks, which the template of model `{model}` does not use; use `auto`."
                ),
            ));
        }
        Ok(())
    }
}

/// How the engine treats the answer.
pub fn engine_choice(mode: &ToolMode) -> ToolChoice {
    match mode {
        ToolMode::None => ToolChoice::None,
        _ => ToolChoice::Auto,
    }
}

/// The grammar of a `required` or named answer: `<tool_call>` blocks holding
/// `{"name": ..., "arguments": ...}` valid against the declared schemas.
pub fn constraint(request: &ToolRequest) -> Option<Constraint> {
    let (names, parallel): (Vec<&str>, bool) = match &request.mode {
        ToolMode::None | ToolMode::Auto => return None,
        ToolMode::Required { parallel } => (request.tools.iter().map(|t| t.function.name.as_str()).collect(), *parallel),
        ToolMode::Named(name) => (vec![name.as_str()], false),
    };
    let calls: Vec<Value> = request
        .tools
        .iter()
        .filter(|t| names.contains(&t.function.name.as_str()))
        .map(|t| {
            let arguments = match &t.function.parameters {
                Some(p) => Value::Object(p.clone().into_iter().collect()),
                None => serde_json::json!({"type": "object"}),
            };
            serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = serde_json::json!({"anyOf": calls});
    let repeat = if parallel { " (\"\\n\" call)*" } else { "" };
    Some(Constraint::Lark(format!(
        "start: call{repeat}\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: %json {schema}\n"
    )))
}

/// The engine's parsed calls as OpenAI's `tool_calls`.
pub fn calls(engine: Vec<ToolCallResponse>) -> Vec<ToolCall> {
    engine
        .into_iter()
        .map(|c| ToolCall {
            id: if c.id.starts_with("call") { c.id } else { format!("call_{}", c.id) },
            kind: "function".into(),
            function: FunctionCall { name: c.function.name, arguments: c.function.arguments },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FunctionDefinition, FunctionName, NamedToolChoice};

    fn weather() -> ToolDefinition {
        ToolDefinition {
            kind: "function".into(),
            function: FunctionDefinition {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: Some(serde_json::json!({
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                })),
                strict: None,
            },
        }
    }

    #[test]
    fn choices_are_checked_against_the_tools() {
        let mode = |choice| validate(Some(vec![weather()]), choice, None, ToolLayout::Chat).map(|r| r.unwrap().mode);
        assert_eq!(mode(None).unwrap(), ToolMode::Auto);
        assert_eq!(mode(Some(ToolChoiceInput::Mode("required".into()))).unwrap(), ToolMode::Required { parallel: true });
        let named = |name: &str| {
            Some(ToolChoiceInput::Named(NamedToolChoice {
                kind: "function".into(),
                function: FunctionName { name: name.into() },
            }))
        };
        assert_eq!(mode(named("get_weather")).unwrap(), ToolMode::Named("get_weather".into()));
        assert_eq!(mode(named("nope")).unwrap_err().param.as_deref(), Some("tool_choice"));
        assert_eq!(mode(Some(ToolChoiceInput::Mode("always".into()))).unwrap_err().param.as_deref(), Some("tool_choice"));
        let err = validate(None, Some(ToolChoiceInput::Mode("required".into())), None, ToolLayout::Chat).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("tool_choice"));
        assert!(validate(Some(vec![]), None, None, ToolLayout::Chat).unwrap().is_none());
        let mut bad = weather();
        bad.function.name = "no spaces".into();
        let param = |layout| validate(Some(vec![bad.clone()]), None, None, layout).unwrap_err().param;
        assert_eq!(param(ToolLayout::Chat).as_deref(), Some("tools[0].function.name"));
        assert_eq!(param(ToolLayout::Responses).as_deref(), Some("tools[0].name"));
    }

    #[test]
    fn templates_without_tools_refuse_them() {
        let plain = TemplateSupport::of(Some("{% for m in messages %}{{ m.content }}{% endfor %}"));
        assert_eq!(plain.check("m", &ToolMode::Auto).unwrap_err().param.as_deref(), Some("tools"));
        let qwen = TemplateSupport::of(Some("{%- if tools %}<tools>{{ tools }}</tools> <tool_call>{% endif %}"));
        qwen.check("m", &ToolMode::Required { parallel: true }).unwrap();
        let llama = TemplateSupport::of(Some("{%- if tools %}{{ tools }}{% endif %}"));
        llama.check("m", &ToolMode::Auto).unwrap();
        assert_eq!(llama.check("m", &ToolMode::Named("f".into())).unwrap_err().param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn the_grammar_names_only_the_chosen_functions() {
        let mut other = weather();
        other.function.name = "get_time".into();
        let req = validate(Some(vec![weather(), other]), Some(ToolChoiceInput::Named(NamedToolChoice {
            kind: "function".into(),
            function: FunctionName { name: "get_time".into() },
        })), None, ToolLayout::Chat)
        .unwrap()
        .unwrap();
        let Some(Constraint::Lark(grammar)) = constraint(&req) else { panic!("no grammar") };
        assert!(grammar.contains("\"const\":\"get_time\"") && !grammar.contains("get_weather"), "{grammar}");
        assert!(!grammar.contains(")*"), "one call only: {grammar}");
        let auto = ToolRequest { mode: ToolMode::Auto, ..req };
        assert!(constraint(&auto).is_none());
    }
}
