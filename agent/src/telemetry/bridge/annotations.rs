//! Pod annotations to bridge settings: which annotations a pod may set ([`PUBLISH_ANNOTATION`] and
//! the others), how a topic template's placeholders are filled ([`expand`]), and the checks a
//! pod's MQTT annotations pass at admission ([`parse_annotations`]). It only reads maps and
//! strings; it routes nothing.

use std::collections::BTreeMap;

use crate::topic::{TopicFilter, TopicName};

/// Topic a pod's stdout lines are published on.
pub const PUBLISH_ANNOTATION: &str = "lichen.dev/mqtt-publish";
/// QoS of those messages.
pub const QOS_ANNOTATION: &str = "lichen.dev/mqtt-qos";
/// Retain flag of those messages.
pub const RETAIN_ANNOTATION: &str = "lichen.dev/mqtt-retain";
/// Filters whose messages go to the pod's stdin.
pub const SUBSCRIBE_ANNOTATION: &str = "lichen.dev/mqtt-subscribe";

/// What a pod asked of MQTT in its annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMqtt {
    /// The publish topic template.
    pub publish: Option<String>,
    /// 0 or 1.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Subscription filter templates.
    pub subscribe: Vec<String>,
}

/// Values for a topic template's placeholders.
#[derive(Debug, Clone, Copy)]
pub struct TopicVars<'a> {
    /// `{node}`.
    pub node: &'a str,
    /// `{namespace}`.
    pub namespace: &'a str,
    /// `{pod}`.
    pub pod: &'a str,
    /// `{container}`.
    pub container: &'a str,
}

/// A topic template that cannot be filled in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its `}`.
    #[error("{0:?}: unclosed '{{'")]
    Unclosed(String),
    /// A placeholder other than the four known ones.
    #[error(
        "{template:?}: unknown placeholder {{{name}}}; use {{node}}, {{namespace}}, {{pod}} or {{container}}"
    )]
    Unknown {
        /// The template.
        template: String,
        /// The placeholder's name.
        name: String,
    },
}

/// Fills in a template's placeholders, or names the one it does not know.
pub fn expand(template: &str, vars: &TopicVars<'_>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| TemplateError::Unclosed(template.to_owned()))?;
        out.push_str(match &after[..close] {
            "node" => vars.node,
            "namespace" => vars.namespace,
            "pod" => vars.pod,
            "container" => vars.container,
            other => {
                return Err(TemplateError::Unknown { template: template.to_owned(), name: other.to_owned() });
            }
        });
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads the MQTT annotations of a pod; `None` if it has none. Errors are `(field, message)`.
pub fn parse_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<PodMqtt>, Vec<(String, String)>> {
    let field = |a: &str| format!("metadata.annotations[{a}]");
    let mut errs = Vec::new();
    let publish = annotations.get(PUBLISH_ANNOTATION).map(|s| s.trim().to_owned());
    let subscribe: Vec<String> = annotations
        .get(SUBSCRIBE_ANNOTATION)
        .map(|s| s.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    let qos = match annotations.get(QOS_ANNOTATION).map(|s| s.trim()) {
        None | Some("1") => 1,
        Some("0") => 0,
        Some(v) => {
            errs.push((field(QOS_ANNOTATION), format!("{v:?} is not 0 or 1 (QoS 2 is not supported)")));
            1
        }
    };
    let retain = match annotations.get(RETAIN_ANNOTATION).map(|s| s.trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            errs.push((field(RETAIN_ANNOTATION), format!("{v:?} is not \"true\" or \"false\"")));
            false
        }
    };
    if publish.is_none() && subscribe.is_empty() {
        if annotations.contains_key(QOS_ANNOTATION) || annotations.contains_key(RETAIN_ANNOTATION) {
            errs.push((field(PUBLISH_ANNOTATION), "is required when mqtt-qos or mqtt-retain is set".into()));
            return Err(errs);
        }
        return Ok(None);
    }
    // Check templates with every placeholder filled, as they will be.
    let sample = TopicVars { node: "node", namespace: "ns", pod: "pod", container: "c" };
    if let Some(p) = &publish {
        match expand(p, &sample) {
            Ok(t) if TopicName::is_valid(&t) => {}
            Ok(_) => errs.push((
                field(PUBLISH_ANNOTATION),
                format!("{p:?} is not a topic one can publish to (no + or #, not empty)"),
            )),
            Err(e) => errs.push((field(PUBLISH_ANNOTATION), e.to_string())),
        }
    }
    for f in &subscribe {
        match expand(f, &sample) {
            Ok(t) if TopicFilter::is_valid(&t) => {}
            Ok(_) => errs.push((
                field(SUBSCRIBE_ANNOTATION),
                format!("{f:?} is not a valid filter (+ and # stand for whole levels, # only last)"),
            )),
            Err(e) => errs.push((field(SUBSCRIBE_ANNOTATION), e.to_string())),
        }
    }
    if errs.is_empty() { Ok(Some(PodMqtt { publish, qos, retain, subscribe })) } else { Err(errs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn templates_expand_and_unknown_placeholders_are_named() {
        let v = TopicVars { node: "pi-07", namespace: "default", pod: "temp-pi-07", container: "main" };
        assert_eq!(expand("sensors/{node}/{pod}/temp", &v).as_deref(), Ok("sensors/pi-07/temp-pi-07/temp"));
        assert_eq!(expand("{namespace}/{container}", &v).as_deref(), Ok("default/main"));
        assert!(expand("a/{host}", &v).unwrap_err().to_string().contains("{host}"));
        assert!(expand("a/{node", &v).unwrap_err().to_string().contains("unclosed"));
    }

    #[test]
    fn annotations_parse_with_defaults_and_errors_name_the_annotation() {
        assert_eq!(parse_annotations(&ann(&[])), Ok(None));
        let m = parse_annotations(&ann(&[
            (PUBLISH_ANNOTATION, "sensors/{node}/{pod}/temp"),
            (SUBSCRIBE_ANNOTATION, "commands/{node}/#, config/{pod}"),
        ]))
        .expect("valid")
        .expect("some");
        assert_eq!((m.qos, m.retain), (1, false));
        assert_eq!(m.subscribe, vec!["commands/{node}/#", "config/{pod}"]);
        let errs = parse_annotations(&ann(&[
            (PUBLISH_ANNOTATION, "a/+/b"),
            (QOS_ANNOTATION, "2"),
            (RETAIN_ANNOTATION, "yes"),
            (SUBSCRIBE_ANNOTATION, "a/#/b"),
        ]))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields.len(), 4, "{errs:?}");
        assert!(fields.iter().any(|f| f.contains(QOS_ANNOTATION)));
        assert!(parse_annotations(&ann(&[(QOS_ANNOTATION, "0")])).is_err(), "qos without a topic");
    }
}
