//! Labelled metrics, natively: every family of `metrics::FAMILIES` is
//! defined once with its label names while the filter config is created
//! (Envoy refuses definitions later), and each update passes label values.
//! No `stats_tags` are needed: Envoy knows the labels.

use crate::metrics::{Family, Kind, FAMILIES};

use super::abi::{self, envoy_dynamic_module_type_module_buffer as ModuleBuffer};
use super::EnvoyPtr;

/// One defined family: Envoy's id and the label names in definition order.
struct Defined {
    id: usize,
    labels: Vec<String>,
}

/// The ids Envoy gave one filter config's metrics, by family.
pub struct Metrics {
    families: Vec<Option<Defined>>,
}

impl Metrics {
    /// Defines every family; `tags` are the configured attribution tags.
    /// Call only inside `on_http_filter_config_new`.
    pub fn define(config: EnvoyPtr, tags: &[String]) -> Metrics {
        let families = FAMILIES
            .iter()
            .map(|family| define_family(config, family, tags))
            .collect();
        Metrics { families }
    }

    /// Updates metric `name` with `pairs` of labels; labels the family does
    /// not have are dropped (the mock host's check keeps there being none).
    pub fn update<'a>(
        &self,
        config: EnvoyPtr,
        kind: Kind,
        name: &str,
        pairs: impl Iterator<Item = (&'a str, &'a str)>,
        value: u64,
    ) {
        // Envoy refuses a zero increment; the series appears with its first.
        if kind == Kind::Counter && value == 0 {
            return;
        }
        let Some((index, family)) = crate::metrics::family(name) else {
            log::debug!("metric {name} is not defined");
            return;
        };
        let Some(Some(defined)) = self.families.get(index) else {
            return;
        };
        let mut values: Vec<&str> = vec![""; defined.labels.len()];
        for (label, value) in pairs {
            if let Some(at) = defined.labels.iter().position(|l| l == label) {
                values[at] = value;
            }
        }
        let mut buffers: Vec<ModuleBuffer> = values
            .iter()
            .map(|v| ModuleBuffer::from_bytes(v.as_bytes()))
            .collect();
        let (ptr, len) = (buffers.as_mut_ptr(), buffers.len());
        // SAFETY: the config pointer is Envoy's live config object, the
        // buffers live for the call, and Envoy copies what it keeps.
        let result = unsafe {
            match kind {
                Kind::Counter => {
                    abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                        config.0, defined.id, ptr, len, value,
                    )
                }
                Kind::Gauge => abi::envoy_dynamic_module_callback_http_filter_config_set_gauge(
                    config.0, defined.id, ptr, len, value,
                ),
                Kind::Histogram => {
                    abi::envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
                        config.0, defined.id, ptr, len, value,
                    )
                }
            }
        };
        if result != abi::METRICS_SUCCESS {
            log::warn!("could not update metric {}: result {result}", family.name);
        }
    }
}

fn define_family(config: EnvoyPtr, family: &Family, tags: &[String]) -> Option<Defined> {
    let mut labels: Vec<String> = family.labels.iter().map(|l| l.to_string()).collect();
    if family.tags {
        labels.extend(tags.iter().map(|t| format!("tag_{t}")));
    }
    let mut names: Vec<ModuleBuffer> = labels
        .iter()
        .map(|l| ModuleBuffer::from_bytes(l.as_bytes()))
        .collect();
    let name = ModuleBuffer::from_bytes(family.name.as_bytes());
    let mut id = 0usize;
    let (ptr, len) = (names.as_mut_ptr(), names.len());
    // SAFETY: called while Envoy creates the config; buffers live for the call.
    let result = unsafe {
        match family.kind {
            Kind::Counter => abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
                config.0, name, ptr, len, &mut id,
            ),
            Kind::Gauge => abi::envoy_dynamic_module_callback_http_filter_config_define_gauge(
                config.0, name, ptr, len, &mut id,
            ),
            Kind::Histogram => {
                abi::envoy_dynamic_module_callback_http_filter_config_define_histogram(
                    config.0, name, ptr, len, &mut id,
                )
            }
        }
    };
    if result != abi::METRICS_SUCCESS {
        log::error!("could not define metric {}: result {result}", family.name);
        return None;
    }
    Some(Defined { id, labels })
}
