//! The proxy's node metadata, natively. The module ABI does not expose
//! Envoy's node, so the values come from where Istio's agent takes them
//! when it writes the node into the proxy's bootstrap: the proxy's
//! environment (`POD_NAMESPACE`, `ISTIO_META_<KEY>`) and the pod's labels
//! file (`/etc/istio/pod/labels`, one `key="value"` per line).

/// Where the pod's labels are; `MESHLLM_POD_LABELS_FILE` overrides it.
const LABELS_FILE: &str = "/etc/istio/pod/labels";

/// The node metadata value at `path` (below `metadata`), as bytes.
pub fn metadata(path: &[&str]) -> Option<Vec<u8>> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let value = match path {
        ["NAMESPACE"] => env("POD_NAMESPACE").or_else(|| env("ISTIO_META_NAMESPACE")),
        ["LABELS", label] => pod_label(label),
        [key] => env(&format!("ISTIO_META_{key}")),
        _ => None,
    }?;
    Some(value.into_bytes())
}

fn pod_label(label: &str) -> Option<String> {
    let file = std::env::var("MESHLLM_POD_LABELS_FILE").unwrap_or_else(|_| LABELS_FILE.into());
    let text = std::fs::read_to_string(file).ok()?;
    label_value(&text, label)
}

/// The value of `label` in a downward-API labels file.
fn label_value(text: &str, label: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == label).then(|| value.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_downward_api_labels_file() {
        let text = "app=\"chat\"\nservice.istio.io/canonical-name=\"chat-api\"\n";
        assert_eq!(label_value(text, "app").as_deref(), Some("chat"));
        assert_eq!(
            label_value(text, "service.istio.io/canonical-name").as_deref(),
            Some("chat-api")
        );
        assert_eq!(label_value(text, "version"), None);
    }
}
