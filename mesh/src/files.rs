//! InferenceService files as users write them: several InferenceServices in one YAML file
//! (separated by `---`), and a transformer read from such a file or from a file of its own.

use std::path::{Path, PathBuf};

use meshserve_filter_core::transform::Transformer;

use crate::graph::{InferenceGraph, is_graph};
use crate::isvc::InferenceService;

/// Reads every InferenceService in a (multi-document) YAML file (its InferenceGraphs are
/// left out: [`read_documents`] reads both).
pub fn read_services(file: &Path) -> Result<Vec<InferenceService>, String> {
    read_documents(file).map(|(services, _)| services)
}

/// Reads every InferenceService and InferenceGraph in a (multi-document) YAML file; each
/// graph's steps must name InferenceServices of the file.
pub fn read_documents(file: &Path) -> Result<(Vec<InferenceService>, Vec<InferenceGraph>), String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let base = file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let documents: Vec<&str> = text
        .split("\n---")
        .filter(|d| !d.trim().is_empty())
        .collect();
    let mut services = Vec::new();
    let mut graphs: Vec<InferenceGraph> = Vec::new();
    for (i, doc) in documents.iter().enumerate() {
        if is_graph(doc) {
            let graph = InferenceGraph::parse(doc)
                .map_err(|e| format!("{} (document {}): {e}", file.display(), i + 1))?;
            if graphs
                .iter()
                .any(|g| g.name == graph.name && g.namespace == graph.namespace)
            {
                return Err(format!(
                    "{}: InferenceGraph '{}' appears twice",
                    file.display(),
                    graph.name
                ));
            }
            graphs.push(graph);
            continue;
        }
        let isvc = InferenceService::parse(doc, &base)
            .map_err(|e| format!("{} (document {}): {e}", file.display(), i + 1))?;
        if services
            .iter()
            .any(|s: &InferenceService| s.name == isvc.name)
        {
            return Err(format!(
                "{}: InferenceService '{}' appears twice",
                file.display(),
                isvc.name
            ));
        }
        services.push(isvc);
    }
    if services.is_empty() {
        return Err(format!("{} holds no InferenceService", file.display()));
    }
    for graph in &graphs {
        if services
            .iter()
            .any(|s| s.name == graph.name && s.namespace == graph.namespace)
        {
            return Err(format!(
                "{}: InferenceGraph '{}' has the name of an InferenceService of its namespace (they would share a host)",
                file.display(),
                graph.name
            ));
        }
        for name in graph.services() {
            if !services
                .iter()
                .any(|s| s.name == name && s.namespace == graph.namespace)
            {
                let known: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
                return Err(format!(
                    "{}: InferenceGraph '{}' calls InferenceService '{name}', which is not in the file (it has {})",
                    file.display(),
                    graph.name,
                    known.join(", ")
                ));
            }
        }
    }
    Ok((services, graphs))
}

/// Reads a transformer: from an InferenceService YAML (the one named `isvc`, else the first
/// with a `spec.transformer`), or from a file holding the transformer alone.
pub fn load_transformer(file: &std::path::Path, isvc: Option<&str>) -> Result<Transformer, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let first: serde_json::Value = serde_yaml::from_str(text.split("\n---").next().unwrap_or(""))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let spec = if first.get("spec").is_some() {
        let services = read_services(file)?;
        services
            .iter()
            .filter(|s| isvc.is_none_or(|name| s.name == name))
            .find_map(|s| s.transformer.clone())
            .ok_or_else(|| {
                format!(
                    "{}: no InferenceService{} with a spec.transformer",
                    file.display(),
                    isvc.map(|n| format!(" '{n}'")).unwrap_or_default()
                )
            })?
    } else {
        first
    };
    serde_json::from_value(spec).map_err(|e| format!("{}: {e}", file.display()))
}
