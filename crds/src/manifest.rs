//! A TravelJob read from a YAML file (local mode) under the cluster's rules:
//! the apiVersion and kind the API server serves, no field the CRD schema
//! does not have (each named with its path, and the nearest known name), the
//! schema's bounds (`maximum`, `maxLength`, `maxItems`...), types checked with
//! the field's path, then the same [`validate_job`] the operator applies.
//!
//! The schema is the one generated from the types ([`TravelJob::crd`]), so
//! there is no second definition of the fields to keep in step. A file may
//! also hold just the spec (no `apiVersion`/`kind`/`metadata`/`spec` keys);
//! the job is then named after the file.

use kube::CustomResourceExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::spec::{TravelJob, TravelJobSpec};
use crate::validate::{FieldError, ValidationErrors, validate_job};

/// The apiVersion of a TravelJob manifest.
pub const API_VERSION: &str = "kubewan.dev/v1alpha1";
/// The kind of a TravelJob manifest.
pub const KIND: &str = "TravelJob";

/// Why a job file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
}

/// Parses and checks a TravelJob manifest (or a bare spec, named `default_name`).
pub fn parse_job(text: &str, default_name: &str) -> Result<TravelJob, ManifestError> {
    let value: Value =
        serde_saphyr::from_str(text).map_err(|e| ManifestError::Yaml(e.to_string()))?;
    let Value::Object(top) = &value else {
        return Err(invalid(
            "(document)",
            "must be a mapping (a TravelJob or its spec)",
        ));
    };
    let schema = root_schema();
    let is_manifest = ["apiVersion", "kind", "metadata", "spec"]
        .iter()
        .any(|k| top.contains_key(*k));
    let mut errors = Vec::new();
    let job = if is_manifest {
        for (field, want) in [("apiVersion", API_VERSION), ("kind", KIND)] {
            match top.get(field).and_then(Value::as_str) {
                Some(got) if got == want => {}
                got => errors.push(FieldError {
                    field: field.into(),
                    message: format!("must be {want:?}, got {}", shown(got)),
                }),
            }
        }
        for key in top.keys() {
            if !matches!(
                key.as_str(),
                "apiVersion" | "kind" | "metadata" | "spec" | "status"
            ) {
                errors.push(unknown_field(
                    key,
                    key,
                    ["apiVersion", "kind", "metadata", "spec"],
                ));
            }
        }
        if let Some(spec) = top.get("spec") {
            check_schema(spec, &schema["properties"]["spec"], "spec", &mut errors);
        }
        typed::<TravelJob>(text)
    } else {
        check_schema(&value, &schema["properties"]["spec"], "spec", &mut errors);
        typed::<TravelJobSpec>(text).map(|spec| TravelJob::new(default_name, spec))
    };
    // Every problem at once: the schema's, then the type error or the
    // validation's (each field named once).
    match job {
        Err(type_error) => errors.push(type_error),
        Ok(job) => match validate_job(&job) {
            Ok(()) if errors.is_empty() => return Ok(job),
            Ok(()) => {}
            Err(ValidationErrors(more)) => {
                for e in more {
                    if !errors.iter().any(|known| known.field == e.field) {
                        errors.push(e);
                    }
                }
            }
        },
    }
    Err(ManifestError::Invalid(ValidationErrors(errors)))
}

fn shown(value: Option<&str>) -> String {
    value.map_or_else(|| "nothing".into(), |v| format!("{v:?}"))
}

fn invalid(field: &str, message: &str) -> ManifestError {
    ManifestError::Invalid(ValidationErrors(vec![FieldError {
        field: field.into(),
        message: message.into(),
    }]))
}

/// The CRD's OpenAPI schema of a TravelJob, as JSON.
fn root_schema() -> Value {
    let crd = TravelJob::crd();
    crd.spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
}

/// Deserialises `text` as `T`; a type error is named by its field's path.
fn typed<T: DeserializeOwned>(text: &str) -> Result<T, FieldError> {
    let mut failed_at = None;
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            failed_at = Some(e.path().to_string());
            e.into_inner()
        })
    })
    .map_err(|e| FieldError {
        field: match failed_at.as_deref() {
            Some(path) if path != "." => path.to_owned(),
            _ => "(document)".into(),
        },
        message: e.to_string(),
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.into()
    } else {
        format!("{path}.{key}")
    }
}

/// Walks `value` along `schema`: unknown fields and out-of-bounds values
/// become errors at their path. Types are left to the typed deserialisation.
fn check_schema(value: &Value, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let mut fail = |message: String| {
        errors.push(FieldError {
            field: path.into(),
            message,
        })
    };
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let open = schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            for (key, item) in map {
                let child = join(path, key);
                match (properties.and_then(|p| p.get(key)), additional) {
                    (Some(s), _) | (None, Some(s)) => check_schema(item, s, &child, errors),
                    (None, None) if open || properties.is_none() => {}
                    (None, None) => errors.push(unknown_field(
                        &child,
                        key,
                        properties
                            .into_iter()
                            .flat_map(|p| p.keys().map(String::as_str)),
                    )),
                }
            }
        }
        Value::Array(items) => {
            let n = items.len();
            if let Some(bound) = broken_bound(schema, ("minItems", "maxItems"), n as f64) {
                fail(format!("has {n} items, {bound} allowed"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_schema(item, item_schema, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::String(s) => {
            // OpenAPI lengths count characters; validate() bounds the bytes.
            let n = s.chars().count();
            if let Some(bound) = broken_bound(schema, ("minLength", "maxLength"), n as f64) {
                fail(format!("is {n} characters long, {bound} allowed"));
            }
        }
        Value::Number(x) => {
            let x = x.as_f64().unwrap_or(f64::NAN);
            if let Some(bound) = broken_bound(schema, ("minimum", "maximum"), x) {
                fail(format!("is {x}, {bound} allowed"));
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

/// The schema's bound (`min_key`/`max_key`) that `n` breaks, as "at most 5"
/// or "at least 1".
fn broken_bound(schema: &Value, (min_key, max_key): (&str, &str), n: f64) -> Option<String> {
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    match (bound(min_key), bound(max_key)) {
        (_, Some(max)) if n > max => Some(format!("at most {max}")),
        (Some(min), _) if n < min => Some(format!("at least {min}")),
        _ => None,
    }
}

/// "unknown field", with the known name nearest to `key` when one is close.
fn unknown_field<'a>(
    path: &str,
    key: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> FieldError {
    let nearest = known
        .into_iter()
        .map(|k| (edit_distance(&k.to_lowercase(), &key.to_lowercase()), k))
        .filter(|(d, _)| *d <= 3)
        .min();
    FieldError {
        field: path.into(),
        message: match nearest {
            Some((_, k)) => format!("unknown field (did you mean {k:?}?)"),
            None => "unknown field: the TravelJob schema has no such field".into(),
        },
    }
}

/// Levenshtein distance (field names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOLUMES: &str = "  checkpoints: {hostPath: {path: /c}}\n  inputs: {hostPath: {path: /i}}\n  output: {volume: {hostPath: {path: /o}}}\n";

    fn manifest(head: &str, spec: &str) -> String {
        format!("{head}spec:\n  keyframes: [a.png, b.png]\n{spec}{VOLUMES}")
    }

    const HEAD: &str =
        "apiVersion: kubewan.dev/v1alpha1\nkind: TravelJob\nmetadata: {name: trip}\n";

    fn error(text: &str) -> String {
        parse_job(text, "file").unwrap_err().to_string()
    }

    #[test]
    fn a_good_manifest_and_a_bare_spec_parse() {
        let job = parse_job(&manifest(HEAD, "  resolution: 64x48\n"), "file").unwrap();
        assert_eq!(job.key(), "default/trip");
        let spec = "keyframes: [a, b]\ncheckpoints: {hostPath: {path: /c}}\ninputs: {hostPath: {path: /i}}\noutput: {volume: {hostPath: {path: /o}}}\n";
        assert_eq!(parse_job(spec, "file").unwrap().key(), "default/file");
    }

    #[test]
    fn wrong_kind_and_api_version_are_refused() {
        let text = manifest("apiVersion: v1\nkind: Pod\nmetadata: {name: trip}\n", "");
        let err = error(&text);
        assert!(
            err.contains("apiVersion: must be \"kubewan.dev/v1alpha1\", got \"v1\""),
            "{err}"
        );
        assert!(
            err.contains("kind: must be \"TravelJob\", got \"Pod\""),
            "{err}"
        );
        let err = error(&manifest("metadata: {name: trip}\n", ""));
        assert!(
            err.contains("apiVersion: must be") && err.contains("got nothing"),
            "{err}"
        );
    }

    #[test]
    fn misspelt_fields_are_named_with_the_nearest_known_name() {
        let err = error(&manifest(
            HEAD,
            "  resolutoin: 64x48\n  runner: {gpus: 1, nodeSelectr: {a: b}}\n",
        ));
        assert!(
            err.contains("spec.resolutoin: unknown field (did you mean \"resolution\"?)"),
            "{err}"
        );
        assert!(
            err.contains("spec.runner.nodeSelectr: unknown field"),
            "{err}"
        );
        // free-form maps (labels) take any key
        parse_job(
            &manifest(HEAD, "  runner: {labels: {anything: goes}}\n"),
            "f",
        )
        .unwrap();
        let err = error(&format!("{}spce: {{}}\n", manifest(HEAD, "")));
        assert!(
            err.contains("spce: unknown field (did you mean \"spec\"?)"),
            "{err}"
        );
    }

    #[test]
    fn schema_bounds_and_types_are_named() {
        let err = error(&manifest(HEAD, "  frames: 4000000001\n  steps: 0\n"));
        assert!(
            err.contains("spec.frames: is 4000000001, at most 241 allowed"),
            "{err}"
        );
        assert!(
            err.contains("spec.steps: is 0, at least 1 allowed"),
            "{err}"
        );
        let err = error(&manifest(HEAD, "  chain: [yes]\n"));
        assert!(err.contains("spec.chain"), "{err}");
        let err = error(&manifest(HEAD, "  fps: sixteen\n"));
        assert!(err.contains("spec.fps"), "{err}");
    }

    #[test]
    fn then_the_operators_validation_applies() {
        let err = error(&manifest(
            "apiVersion: kubewan.dev/v1alpha1\nkind: TravelJob\nmetadata: {name: ../up}\n",
            "  resolution: 4000x4000\n",
        ));
        assert!(
            err.contains("metadata.name") && err.contains("spec.resolution"),
            "{err}"
        );
    }
}
