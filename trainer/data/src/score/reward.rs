//! A reward model behind HTTP: one scalar per (prompt, response). Two
//! shapes: vLLM's `/classify` (`{"model","input":[text,...]}` answered by
//! `{"data":[{"probs":[...]}]}`) and a plain one
//! (`{"model","prompt","responses":[...],"conversations":[[...]]}` answered
//! by `{"scores":[...]}`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{RewardApi, RewardConfig};

/// The text a `/classify` endpoint scores: one user turn and one answer.
pub fn render(prompt: &str, response: &str) -> String {
    format!("User: {prompt}\n\nAssistant: {response}")
}

pub fn request_body(cfg: &RewardConfig, prompt: &str, responses: &[String]) -> Value {
    match cfg.api {
        RewardApi::Classify => json!({
            "model": cfg.model,
            "input": responses.iter().map(|r| render(prompt, r)).collect::<Vec<_>>(),
        }),
        RewardApi::Scores => json!({
            "model": cfg.model,
            "prompt": prompt,
            "responses": responses,
            "conversations": responses.iter().map(|r| json!([
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": r},
            ])).collect::<Vec<_>>(),
        }),
    }
}

/// The scores in a reply, in order; `n` of them or an error.
pub fn parse_scores(v: &Value, n: usize) -> Result<Vec<f64>, String> {
    let scores: Vec<f64> = if let Some(s) = v.get("scores").and_then(Value::as_array) {
        s.iter()
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| format!("`scores` holds a non-number: {x}"))
            })
            .collect::<Result<_, _>>()?
    } else if let Some(data) = v.get("data").and_then(Value::as_array) {
        let mut out = Vec::new();
        for (i, d) in data.iter().enumerate() {
            let x = if let Some(p) = d.get("probs").and_then(Value::as_array) {
                // One class: the reward itself; several: the last (positive) class.
                p.last().and_then(Value::as_f64)
            } else if let Some(s) = d.get("score").and_then(Value::as_f64) {
                Some(s)
            } else {
                d.get("logits")
                    .and_then(Value::as_array)
                    .and_then(|l| l.last())
                    .and_then(Value::as_f64)
            };
            out.push(x.ok_or_else(|| format!("data[{i}] has no `probs`, `score` or `logits`"))?);
        }
        out
    } else {
        return Err(format!(
            "reward reply has neither `scores` nor `data`: {}",
            crate::client::clip(&v.to_string(), 200)
        ));
    };
    if scores.len() != n {
        return Err(format!(
            "reward reply has {} scores for {n} responses",
            scores.len()
        ));
    }
    if scores.iter().any(|x| !x.is_finite()) {
        return Err("reward reply holds a non-finite score".into());
    }
    Ok(scores)
}

pub struct RewardClient {
    cfg: RewardConfig,
    http: reqwest::Client,
}

impl RewardClient {
    /// A client for `cfg`; an error naming the field where its `timeout_s`
    /// is not a positive number of seconds.
    pub fn new(cfg: &RewardConfig) -> crate::error::Result<Self> {
        cfg.validate()?;
        Ok(RewardClient {
            cfg: cfg.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs_f64(cfg.timeout_s))
                .build()
                .map_err(|e| crate::error::DataError::Endpoint(crate::error::chain(&e)))?,
        })
    }

    /// Score every response to one prompt in one request (retried twice on
    /// 429, 5xx and connection errors).
    pub async fn score(&self, prompt: &str, responses: &[String]) -> Result<Vec<f64>, String> {
        let body = request_body(&self.cfg, prompt, responses);
        let mut last = String::new();
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
            }
            let mut req = self.http.post(&self.cfg.url).json(&body);
            if let Some(k) = self
                .cfg
                .api_key_env
                .as_ref()
                .and_then(|v| std::env::var(v).ok())
            {
                req = req.bearer_auth(k);
            }
            match req.send().await {
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    if status.as_u16() == 429 || status.is_server_error() {
                        last = format!("HTTP {status}: {}", crate::client::clip(&text, 200));
                        continue;
                    }
                    if !status.is_success() {
                        return Err(format!(
                            "HTTP {status}: {}",
                            crate::client::clip(&text, 300)
                        ));
                    }
                    let v: Value = serde_json::from_str(&text).map_err(|e| {
                        format!(
                            "reward reply is not JSON ({e}): {}",
                            crate::client::clip(&text, 200)
                        )
                    })?;
                    return parse_scores(&v, responses.len());
                }
                Err(e) => last = format!("{}: {}", self.cfg.url, crate::client::error_chain(&e)),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_parse_and_bad_ones_fail() {
        assert_eq!(
            parse_scores(&json!({"scores": [0.1, 0.5]}), 2).unwrap(),
            vec![0.1, 0.5]
        );
        let classify = json!({"id":"x","object":"list","data":[
            {"index":0,"label":"LABEL_0","probs":[0.25],"num_classes":1},
            {"index":1,"label":"LABEL_0","probs":[0.75],"num_classes":1}]});
        assert_eq!(parse_scores(&classify, 2).unwrap(), vec![0.25, 0.75]);
        let two = json!({"data":[{"probs":[0.9, 0.1]}]});
        assert_eq!(parse_scores(&two, 1).unwrap(), vec![0.1]);
        assert!(parse_scores(&json!({"scores": [0.1]}), 2)
            .unwrap_err()
            .contains("1 scores for 2"));
        assert!(parse_scores(&json!({"scores": ["a"]}), 1).is_err());
        assert!(parse_scores(&json!({"result": 1}), 1).is_err());
        assert!(parse_scores(&json!({"data":[{"label":"x"}]}), 1).is_err());
    }

    #[test]
    fn request_shapes() {
        let mut cfg = RewardConfig {
            url: "http://x/classify".into(),
            model: Some("rm".into()),
            api: RewardApi::Classify,
            api_key_env: None,
            timeout_s: 5.0,
            domains: None,
        };
        let b = request_body(&cfg, "q", &["a".into(), "b".into()]);
        assert_eq!(b["input"][1], "User: q\n\nAssistant: b");
        cfg.api = RewardApi::Scores;
        let b = request_body(&cfg, "q", &["a".into()]);
        assert_eq!(b["conversations"][0][1]["content"], "a");
        assert_eq!(b["responses"][0], "a");
    }
}
