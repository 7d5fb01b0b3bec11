//! The aggregated view of every healthy upstream: exposed (namespaced) names, and the routes that
//! take a request for an exposed name back to the server and the name it knows. A [`Catalog`] is
//! immutable; the gateway builds a new one whenever an upstream's lists or health change and
//! swaps it in, so readers never see a half-updated view.

use std::collections::HashMap;
use std::sync::Arc;

use concord_config::{NAMESPACE_SEPARATOR, PrefixMode};
use rmcp::model::{Prompt, Resource, ResourceTemplate, Tool};

/// What one upstream currently offers, as it listed it.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct UpstreamLists {
    pub tools: Vec<Tool>,
    pub prompts: Vec<Prompt>,
    pub resources: Vec<Resource>,
    pub templates: Vec<ResourceTemplate>,
}

/// One upstream's contribution to a catalog build.
pub(crate) struct CatalogInput<'a> {
    pub server: &'a Arc<str>,
    pub prefix: PrefixMode,
    pub lists: &'a UpstreamLists,
}

/// Where an exposed tool or prompt name leads.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Route {
    pub server: Arc<str>,
    /// The name the upstream itself uses.
    pub name: String,
}

/// Two servers in `never` prefix mode expose the same name.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Collision {
    pub kind: &'static str,
    pub name: String,
    pub first: Arc<str>,
    pub second: Arc<str>,
}

impl std::fmt::Display for Collision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} name {:?} is exposed by both server {:?} and server {:?}; set `prefix = \"always\"` or \"conditional\" on one of them",
            self.kind, self.name, self.first, self.second
        )
    }
}

#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub tools: Vec<Tool>,
    pub tool_routes: HashMap<String, Route>,
    pub prompts: Vec<Prompt>,
    pub prompt_routes: HashMap<String, Route>,
    pub resources: Vec<Resource>,
    pub resource_routes: HashMap<String, Arc<str>>,
    pub templates: Vec<ResourceTemplate>,
    pub template_routes: Vec<(UriTemplate, Arc<str>)>,
    /// Name clashes found while building; the later server's entry was left out.
    pub collisions: Vec<Collision>,
}

pub(crate) fn namespaced(server: &str, name: &str) -> String {
    format!("{server}{NAMESPACE_SEPARATOR}{name}")
}

impl Catalog {
    /// Builds the aggregated catalog from the healthy upstreams, in configuration order.
    pub fn build(inputs: &[CatalogInput<'_>]) -> Catalog {
        let mut catalog = Catalog::default();

        let tool_names = |input: &CatalogInput<'_>| -> Vec<String> {
            input
                .lists
                .tools
                .iter()
                .map(|t| t.name.to_string())
                .collect()
        };
        let prompt_names = |input: &CatalogInput<'_>| -> Vec<String> {
            input.lists.prompts.iter().map(|p| p.name.clone()).collect()
        };
        let tool_exposed = exposed_names(inputs, tool_names);
        let prompt_exposed = exposed_names(inputs, prompt_names);

        for (input, exposed) in inputs.iter().zip(tool_exposed) {
            for (tool, exposed_name) in input.lists.tools.iter().zip(exposed) {
                if let Some(existing) = catalog.tool_routes.get(&exposed_name) {
                    catalog.collisions.push(Collision {
                        kind: "tool",
                        name: exposed_name,
                        first: existing.server.clone(),
                        second: input.server.clone(),
                    });
                    continue;
                }
                let mut exposed_tool = tool.clone();
                exposed_tool.name = exposed_name.clone().into();
                catalog.tools.push(exposed_tool);
                catalog.tool_routes.insert(
                    exposed_name,
                    Route {
                        server: input.server.clone(),
                        name: tool.name.to_string(),
                    },
                );
            }
        }
        for (input, exposed) in inputs.iter().zip(prompt_exposed) {
            for (prompt, exposed_name) in input.lists.prompts.iter().zip(exposed) {
                if let Some(existing) = catalog.prompt_routes.get(&exposed_name) {
                    catalog.collisions.push(Collision {
                        kind: "prompt",
                        name: exposed_name,
                        first: existing.server.clone(),
                        second: input.server.clone(),
                    });
                    continue;
                }
                let mut exposed_prompt = prompt.clone();
                exposed_prompt.name = exposed_name.clone();
                catalog.prompts.push(exposed_prompt);
                catalog.prompt_routes.insert(
                    exposed_name,
                    Route {
                        server: input.server.clone(),
                        name: prompt.name.clone(),
                    },
                );
            }
        }
        // Resource URIs are global identifiers: never rewritten, routed by who listed them.
        for input in inputs {
            for resource in &input.lists.resources {
                if catalog.resource_routes.contains_key(&resource.uri) {
                    continue;
                }
                catalog
                    .resource_routes
                    .insert(resource.uri.clone(), input.server.clone());
                catalog.resources.push(resource.clone());
            }
            for template in &input.lists.templates {
                if catalog
                    .templates
                    .iter()
                    .any(|t| t.uri_template == template.uri_template)
                {
                    continue;
                }
                catalog.template_routes.push((
                    UriTemplate::parse(&template.uri_template),
                    input.server.clone(),
                ));
                catalog.templates.push(template.clone());
            }
        }
        catalog
    }

    /// The server that serves `uri`: the one that listed it, else the first whose template
    /// matches it.
    pub fn resource_owner(&self, uri: &str) -> Option<&Arc<str>> {
        self.resource_routes.get(uri).or_else(|| {
            self.template_routes
                .iter()
                .find(|(template, _)| template.matches(uri))
                .map(|(_, server)| server)
        })
    }

    /// The server whose template is exactly `template` (for completion requests).
    pub fn template_owner(&self, template: &str) -> Option<&Arc<str>> {
        self.template_routes
            .iter()
            .find(|(t, _)| t.source == template)
            .map(|(_, server)| server)
    }
}

/// Applies each server's prefix mode: the exposed name for every entry, in input order.
fn exposed_names(
    inputs: &[CatalogInput<'_>],
    names_of: impl Fn(&CatalogInput<'_>) -> Vec<String>,
) -> Vec<Vec<String>> {
    let per_server: Vec<Vec<String>> = inputs.iter().map(&names_of).collect();
    let mut owners: HashMap<&str, usize> = HashMap::new();
    for names in &per_server {
        let mut seen = std::collections::HashSet::new();
        for name in names {
            if seen.insert(name.as_str()) {
                *owners.entry(name.as_str()).or_default() += 1;
            }
        }
    }
    inputs
        .iter()
        .zip(&per_server)
        .map(|(input, names)| {
            names
                .iter()
                .map(|name| match input.prefix {
                    PrefixMode::Always => namespaced(input.server, name),
                    PrefixMode::Never => name.clone(),
                    PrefixMode::Conditional if owners[name.as_str()] > 1 => {
                        namespaced(input.server, name)
                    }
                    PrefixMode::Conditional => name.clone(),
                })
                .collect()
        })
        .collect()
}

/// A minimal RFC 6570 level-1 matcher: literal text and `{var}` expressions, where a variable
/// matches one or more characters other than `/` (or anything, for `{+var}` / `{/var*}` forms).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UriTemplate {
    pub source: String,
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq)]
enum TemplatePart {
    Literal(String),
    Var { greedy: bool },
}

impl UriTemplate {
    pub fn parse(source: &str) -> UriTemplate {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                parts.push(TemplatePart::Literal(rest[open..].to_string()));
                rest = "";
                break;
            };
            let expr = &rest[open + 1..open + close];
            let greedy = expr.starts_with('+') || expr.starts_with('#') || expr.ends_with('*');
            parts.push(TemplatePart::Var { greedy });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_string()));
        }
        UriTemplate {
            source: source.to_string(),
            parts,
        }
    }

    pub fn matches(&self, uri: &str) -> bool {
        match_parts(&self.parts, uri)
    }
}

fn match_parts(parts: &[TemplatePart], input: &str) -> bool {
    match parts.split_first() {
        None => input.is_empty(),
        Some((TemplatePart::Literal(lit), rest)) => input
            .strip_prefix(lit.as_str())
            .is_some_and(|remaining| match_parts(rest, remaining)),
        Some((TemplatePart::Var { greedy }, rest)) => {
            // Try every split point; templates are short, so backtracking stays cheap.
            let limit = if *greedy {
                input.len()
            } else {
                input.find('/').unwrap_or(input.len())
            };
            (1..=limit)
                .filter(|&end| input.is_char_boundary(end))
                .any(|end| match_parts(rest, &input[end..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::JsonObject;

    fn tool(name: &str) -> Tool {
        Tool::new(name.to_string(), "d", Arc::new(JsonObject::new()))
    }

    fn lists(tools: &[&str]) -> UpstreamLists {
        UpstreamLists {
            tools: tools.iter().map(|t| tool(t)).collect(),
            ..Default::default()
        }
    }

    fn names(catalog: &Catalog) -> Vec<String> {
        catalog.tools.iter().map(|t| t.name.to_string()).collect()
    }

    #[test]
    fn always_prefixes_and_routes_back() {
        let a: Arc<str> = "fs".into();
        let l = lists(&["read", "write"]);
        let catalog = Catalog::build(&[CatalogInput {
            server: &a,
            prefix: PrefixMode::Always,
            lists: &l,
        }]);
        assert_eq!(names(&catalog), ["fs__read", "fs__write"]);
        assert_eq!(
            catalog.tool_routes["fs__read"],
            Route {
                server: a.clone(),
                name: "read".into()
            }
        );
    }

    #[test]
    fn conditional_prefixes_only_collisions() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let (la, lb) = (lists(&["echo", "only_a"]), lists(&["echo", "only_b"]));
        let catalog = Catalog::build(&[
            CatalogInput {
                server: &a,
                prefix: PrefixMode::Conditional,
                lists: &la,
            },
            CatalogInput {
                server: &b,
                prefix: PrefixMode::Conditional,
                lists: &lb,
            },
        ]);
        assert_eq!(names(&catalog), ["a__echo", "only_a", "b__echo", "only_b"]);
        assert!(catalog.collisions.is_empty());
    }

    #[test]
    fn never_reports_collision_naming_both() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let (la, lb) = (lists(&["echo"]), lists(&["echo"]));
        let catalog = Catalog::build(&[
            CatalogInput {
                server: &a,
                prefix: PrefixMode::Never,
                lists: &la,
            },
            CatalogInput {
                server: &b,
                prefix: PrefixMode::Never,
                lists: &lb,
            },
        ]);
        assert_eq!(names(&catalog), ["echo"]);
        let text = catalog.collisions[0].to_string();
        assert!(text.contains("\"a\"") && text.contains("\"b\"") && text.contains("\"echo\""));
    }

    #[test]
    fn tool_fields_survive_renaming() {
        let a: Arc<str> = "s".into();
        let mut t = tool("t");
        t.annotations = Some(rmcp::model::ToolAnnotations::new().read_only(true));
        t.output_schema = Some(Arc::new(JsonObject::new()));
        let l = UpstreamLists {
            tools: vec![t.clone()],
            ..Default::default()
        };
        let catalog = Catalog::build(&[CatalogInput {
            server: &a,
            prefix: PrefixMode::Always,
            lists: &l,
        }]);
        assert_eq!(catalog.tools[0].annotations, t.annotations);
        assert_eq!(catalog.tools[0].output_schema, t.output_schema);
    }

    #[test]
    fn resources_route_by_listing_then_template() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let la = UpstreamLists {
            resources: vec![Resource::new("file:///x", "x")],
            ..Default::default()
        };
        let lb = UpstreamLists {
            templates: vec![ResourceTemplate::new("demo://resource/{id}", "r")],
            ..Default::default()
        };
        let catalog = Catalog::build(&[
            CatalogInput {
                server: &a,
                prefix: PrefixMode::Always,
                lists: &la,
            },
            CatalogInput {
                server: &b,
                prefix: PrefixMode::Always,
                lists: &lb,
            },
        ]);
        assert_eq!(catalog.resource_owner("file:///x").map(|s| &**s), Some("a"));
        assert_eq!(
            catalog.resource_owner("demo://resource/7").map(|s| &**s),
            Some("b")
        );
        assert_eq!(catalog.resource_owner("demo://resource/7/extra"), None);
        assert_eq!(catalog.resource_owner("other://x"), None);
    }

    #[test]
    fn uri_templates() {
        let t = UriTemplate::parse("test://template/{id}/data");
        assert!(t.matches("test://template/42/data"));
        assert!(!t.matches("test://template//data"));
        assert!(!t.matches("test://template/4/2/data"));
        assert!(UriTemplate::parse("file://{+path}").matches("file://a/b/c"));
    }
}
