//! Cedar decides: the policies of `policies/`, hot-reloaded, answer every
//! [`Request`] (DESIGN.md "Authorization", STYLE.md §6).
//!
//! The state is an immutable [`Snapshot`]: the policy part (schema, policy set
//! with ids from `@id`, template links, an index of the policies by action and
//! principal, topic facts) and the platform part (one prebuilt entity per
//! platform). Each is rebuilt whole and swapped through arc-swap; a request
//! borrows the current one and never sees a partial set. A failed reload keeps
//! the last good set and names file:line:col.
//!
//! Why an index: Cedar evaluates every policy of the set it is given (about
//! 1 µs per policy). We give it only the shards that can apply: policies for
//! this action with any principal, those scoped to a group the platform is in,
//! and those naming the platform itself (links). Forbid-over-permit makes the
//! union of the shard answers equal to the answer of the whole set (tested).
//!
//! This module must not: act on a decision (alerts, audit, ending
//! subscriptions are the caller's), or read the store.

use super::entities::{names, platform_entry, uid, PlatformEntry, PlatformFacts, TopicsFile};
use super::{Action, Authorize, Decision, Request};
use arc_swap::ArcSwap;
use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Effect, Entities, Entity, EntityUid, Policy,
    PolicyId, PolicySet, PrincipalConstraint, RestrictedExpression, Schema, SlotId, ValidationMode, Validator,
};
use miette::Diagnostic;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The shipped policies (`policies/` of this repository): written by
/// [`install_defaults`], used when a grid has no policies directory.
pub const DEFAULT_POLICIES: &[(&str, &str)] = &[
    ("schema.cedarschema", include_str!("../../policies/schema.cedarschema")),
    ("base.cedar", include_str!("../../policies/base.cedar")),
    ("roles.cedar", include_str!("../../policies/roles.cedar")),
    ("honeytokens.cedar", include_str!("../../policies/honeytokens.cedar")),
    ("templates.cedar", include_str!("../../policies/templates.cedar")),
    ("topics.toml", include_str!("../../policies/topics.toml")),
    ("links.toml", include_str!("../../policies/links.toml")),
    ("README.md", include_str!("../../policies/README.md")),
];

/// Writes the shipped policies into `dir` (created if missing) unless it already
/// holds a schema or a `.cedar` file; returns the files written.
pub fn install_defaults(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    if has_policies(dir) {
        return Ok(Vec::new());
    }
    let mut written = Vec::new();
    for (name, text) in DEFAULT_POLICIES {
        let p = dir.join(name);
        if !p.exists() {
            std::fs::write(&p, text)?;
            written.push(p);
        }
    }
    Ok(written)
}

/// Does `dir` hold a schema or a `.cedar` file (at its top level)?
pub fn has_policies(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()).any(|e| matches!(kind_of(&e.path()), Some(FileKind::Schema | FileKind::Policies)))
    })
}

// ---- errors ---------------------------------------------------------------

/// One problem in the policies directory, at file:line:col (line 0: the whole file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.col, self.message)
        }
    }
}

/// Why a policy set was refused: every problem found, one per line.
#[derive(Debug, Clone, thiserror::Error)]
pub struct PolicyError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl PolicyError {
    fn one(file: &Path, line: usize, col: usize, message: impl Into<String>) -> PolicyError {
        PolicyError { problems: vec![Problem { file: file.to_path_buf(), line, col, message: message.into() }] }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut off = offset.min(text.len());
    while !text.is_char_boundary(off) {
        off -= 1;
    }
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// A Cedar diagnostic (and its related ones) as located problems; miette label
/// offsets index the file's text.
fn located(d: &dyn Diagnostic, file: &Path, text: &str, prefix: &str) -> Vec<Problem> {
    let one = |d: &dyn Diagnostic| {
        let mut message = format!("{prefix}{d}");
        if let Some(h) = d.help() {
            message.push_str(&format!(" (help: {h})"));
        }
        let (line, col) = d.labels().and_then(|mut l| l.next()).map_or((0, 0), |l| line_col(text, l.offset()));
        Problem { file: file.to_path_buf(), line, col, message }
    };
    let mut v = vec![one(d)];
    if let Some(related) = d.related() {
        v.extend(related.map(one));
    }
    v
}

// ---- sources --------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Schema,
    Policies,
    Topics,
    Links,
}

fn kind_of(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with('.') {
        return None; // editor temporaries
    }
    match path.extension()?.to_str()? {
        "cedarschema" => Some(FileKind::Schema),
        "cedar" => Some(FileKind::Policies),
        _ if name == "topics.toml" => Some(FileKind::Topics),
        _ if name == "links.toml" => Some(FileKind::Links),
        _ => None,
    }
}

/// One file of the policies directory.
struct Source {
    path: PathBuf,
    kind: FileKind,
    text: String,
}

/// The policy files under `dir` (recursively), in name order.
fn read_dir(dir: &Path) -> Result<Vec<Source>, PolicyError> {
    let mut out = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = pending.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| PolicyError::one(&d, 0, 0, format!("cannot read: {e}")))?;
        for e in entries {
            let path = e.map_err(|e| PolicyError::one(&d, 0, 0, format!("cannot read: {e}")))?.path();
            if path.is_dir() {
                if depth < 8 {
                    pending.push((path, depth + 1));
                }
            } else if let Some(kind) = kind_of(&path) {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| PolicyError::one(&path, 0, 0, format!("cannot read: {e}")))?;
                out.push(Source { path, kind, text });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn embedded_sources() -> Vec<Source> {
    DEFAULT_POLICIES
        .iter()
        .filter_map(|(name, text)| {
            let path = PathBuf::from("policies").join(name);
            kind_of(&path).map(|kind| Source { path, kind, text: text.to_string() })
        })
        .collect()
}

// ---- the policy part of a snapshot -----------------------------------------

/// Where a policy comes from, for explain and error messages.
#[derive(Debug, Clone)]
struct Origin {
    file: PathBuf,
    line: usize,
    /// Index of the file in the sources, for locating validation errors.
    source: Option<usize>,
}

/// Policies, by action (index into `Action::ALL`), by principal scope.
#[derive(Default)]
struct Shards {
    any: PolicySet,
    groups: HashMap<EntityUid, PolicySet>,
    principals: HashMap<EntityUid, PolicySet>,
}

struct PolicyPart {
    schema: Schema,
    set: PolicySet,
    shards: Vec<Shards>,
    origins: HashMap<PolicyId, Origin>,
    honeytokens: HashSet<PolicyId>,
    topics: TopicsFile,
    /// The action entities (with their groups), by index into `Action::ALL`.
    actions: Vec<Entity>,
    controller: EntityUid,
    generation: u64,
    files: usize,
    templates: usize,
    links: usize,
    warnings: Vec<String>,
    /// Time to read, validate and index.
    elapsed: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinksFile {
    #[serde(default)]
    link: Vec<toml::Spanned<LinkEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkEntry {
    template: String,
    principal: String,
    kind: Option<String>,
    topic: Option<String>,
    id: Option<String>,
}

fn toml_problem(src: &Source, e: &toml::de::Error) -> Problem {
    let (line, col) = e.span().map_or((0, 0), |s| line_col(&src.text, s.start));
    Problem { file: src.path.clone(), line, col, message: e.message().to_string() }
}

/// The number N of a parser-assigned id "policyN" (source order).
fn parsed_index(id: &PolicyId) -> usize {
    id.to_string().strip_prefix("policy").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX)
}

enum Parsed {
    Static(Policy),
    Template(cedar_policy::Template),
}

impl PolicyPart {
    fn build(sources: &[Source], dir: &Path, generation: u64) -> Result<PolicyPart, PolicyError> {
        let start = Instant::now();
        let mut problems = Vec::new();
        let schemas: Vec<&Source> = sources.iter().filter(|s| s.kind == FileKind::Schema).collect();
        let [schema_src] = schemas.as_slice() else {
            return Err(PolicyError::one(dir, 0, 0, format!("need exactly one *.cedarschema file, found {}", schemas.len())));
        };
        let (schema, warnings) = match Schema::from_cedarschema_str(&schema_src.text) {
            Ok((s, w)) => (s, w.map(|w| format!("{}: {w}", schema_src.path.display())).collect::<Vec<_>>()),
            Err(e) => return Err(PolicyError { problems: located(&e, &schema_src.path, &schema_src.text, "") }),
        };

        let mut set = PolicySet::new();
        let mut origins = HashMap::new();
        let mut templates = 0;
        for (si, src) in sources.iter().enumerate().filter(|(_, s)| s.kind == FileKind::Policies) {
            let parsed = match PolicySet::from_str(&src.text) {
                Ok(p) => p,
                Err(e) => {
                    problems.extend(located(&e, &src.path, &src.text, ""));
                    continue;
                }
            };
            let mut items: Vec<(usize, Parsed)> = parsed
                .policies()
                .map(|p| (parsed_index(p.id()), Parsed::Static(p.clone())))
                .chain(parsed.templates().map(|t| (parsed_index(t.id()), Parsed::Template(t.clone()))))
                .collect();
            items.sort_by_key(|(i, _)| *i);
            let mut cursor = 0;
            for (_, item) in items {
                let text = match &item {
                    Parsed::Static(p) => p.to_cedar().unwrap_or_default(),
                    Parsed::Template(t) => t.to_cedar(),
                };
                // The parser keeps each policy's text verbatim: find it to know its line.
                let at = src.text[cursor..].find(&text).map(|o| cursor + o).or_else(|| src.text.find(&text));
                if let Some(at) = at {
                    cursor = at + text.len();
                }
                let line = at.map_or(0, |at| line_col(&src.text, at).0);
                let file_name = src.path.file_name().and_then(|n| n.to_str()).unwrap_or("policy");
                let annotated = match &item {
                    Parsed::Static(p) => p.annotation("id"),
                    Parsed::Template(t) => t.annotation("id"),
                };
                let id = PolicyId::new(annotated.map_or_else(|| format!("{file_name}:{line}"), str::to_string));
                let added = match item {
                    Parsed::Static(p) => set.add(p.new_id(id.clone())),
                    Parsed::Template(t) => {
                        templates += 1;
                        set.add_template(t.new_id(id.clone()))
                    }
                };
                if let Err(e) = added {
                    problems.push(Problem { file: src.path.clone(), line, col: 1, message: format!("policy {id}: {e}") });
                }
                origins.insert(id, Origin { file: src.path.clone(), line, source: Some(si) });
            }
        }

        let mut topics = TopicsFile::default();
        for src in sources.iter().filter(|s| s.kind == FileKind::Topics) {
            match toml::from_str::<TopicsFile>(&src.text) {
                Ok(t) => topics = t,
                Err(e) => problems.push(toml_problem(src, &e)),
            }
        }

        let mut links = 0;
        for src in sources.iter().filter(|s| s.kind == FileKind::Links) {
            let file: LinksFile = match toml::from_str(&src.text) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(toml_problem(src, &e));
                    continue;
                }
            };
            for entry in file.link {
                let (line, col) = line_col(&src.text, entry.span().start);
                let l = entry.get_ref();
                let mut problem = |message: String| {
                    problems.push(Problem { file: src.path.clone(), line, col, message });
                };
                let tid = PolicyId::new(&l.template);
                let Some(template) = set.template(&tid) else {
                    problem(format!("no policy template with @id(\"{}\")", l.template));
                    continue;
                };
                let n = names();
                let mut vals = HashMap::from([(SlotId::principal(), uid(&n.platform, &l.principal))]);
                let has_resource_slot = template.slots().any(|s| *s == SlotId::resource());
                let resource = match (&l.kind, &l.topic) {
                    (Some(k), None) => Some(uid(&n.topic_kind, k)),
                    (None, Some(t)) => Some(uid(&n.topic, t)),
                    (None, None) => None,
                    (Some(_), Some(_)) => {
                        problem("give `kind` or `topic`, not both".into());
                        continue;
                    }
                };
                match (resource, has_resource_slot) {
                    (Some(r), true) => {
                        vals.insert(SlotId::resource(), r);
                    }
                    (None, false) => {}
                    (None, true) => {
                        problem(format!("template {} needs a resource: `kind` or `topic`", l.template));
                        continue;
                    }
                    (Some(_), false) => {
                        problem(format!("template {} has no ?resource slot", l.template));
                        continue;
                    }
                }
                let target = l.kind.as_deref().or(l.topic.as_deref()).unwrap_or("");
                let id = PolicyId::new(l.id.clone().unwrap_or_else(|| format!("{}/{}/{target}", l.template, l.principal)));
                match set.link(tid, id.clone(), vals) {
                    Ok(()) => {
                        links += 1;
                        origins.insert(id, Origin { file: src.path.clone(), line, source: None });
                    }
                    Err(e) => problem(format!("link {id}: {e}")),
                }
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError { problems });
        }

        let validation = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        for e in validation.validation_errors() {
            let id = e.policy_id();
            let prefix = format!("[policy {id}] ");
            match origins.get(id) {
                Some(Origin { source: Some(si), .. }) => {
                    let src = &sources[*si];
                    problems.extend(located(e, &src.path, &src.text, &prefix).into_iter().take(1));
                }
                Some(o) => problems.push(Problem { file: o.file.clone(), line: o.line, col: 1, message: format!("{prefix}{e}") }),
                None => problems.push(Problem { file: dir.to_path_buf(), line: 0, col: 0, message: format!("{prefix}{e}") }),
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError { problems });
        }
        let mut warnings = warnings;
        warnings.extend(validation.validation_warnings().map(|w| w.to_string()));

        let n = names();
        let schema_path = &schema_src.path;
        let action_entities = schema
            .action_entities()
            .map_err(|e| PolicyError::one(schema_path, 0, 0, format!("actions: {e}")))?;
        let mut actions = Vec::new();
        let mut ancestry = Vec::new();
        for a in Action::ALL {
            let u = uid(&n.action, a.name());
            let entity = action_entities
                .get(&u)
                .ok_or_else(|| PolicyError::one(schema_path, 0, 0, format!("the schema must declare action \"{}\"", a.name())))?;
            let mut anc: Vec<EntityUid> = vec![u.clone()];
            anc.extend(action_entities.ancestors(&u).into_iter().flatten().cloned());
            actions.push(entity.clone());
            ancestry.push(anc);
        }
        let shards = index(&set, &ancestry).map_err(|e| PolicyError::one(dir, 0, 0, format!("policy index: {e}")))?;
        let honeytokens = set.policies().filter(|p| p.annotation("honeytoken").is_some()).map(|p| p.id().clone()).collect();
        Ok(PolicyPart {
            schema,
            files: sources.len(),
            templates,
            links,
            shards,
            origins,
            honeytokens,
            topics,
            actions,
            controller: uid(&n.controller, "grid"),
            generation,
            warnings,
            set,
            elapsed: start.elapsed(),
        })
    }

    fn report(&self) -> ReloadReport {
        ReloadReport {
            generation: self.generation,
            files: self.files,
            policies: self.set.policies().count() - self.links,
            templates: self.templates,
            links: self.links,
            warnings: self.warnings.clone(),
            elapsed: self.elapsed,
        }
    }
}

/// Does an action constraint admit the action whose uid and groups are `ancestry`?
fn admits(c: &ActionConstraint, ancestry: &[EntityUid]) -> bool {
    match c {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(u) => ancestry.first() == Some(u),
        ActionConstraint::In(us) => us.iter().any(|u| ancestry.contains(u)),
    }
}

/// The shards: per action, policies by principal scope. A policy whose scope
/// names a platform (`==` or `in` a Platform, links) goes to that platform; one
/// scoped `in` a group to that group; every other to `any`.
fn index(set: &PolicySet, ancestry: &[Vec<EntityUid>]) -> Result<Vec<Shards>, Box<cedar_policy::PolicySetError>> {
    let platform = &names().platform;
    let mut shards: Vec<Shards> = ancestry.iter().map(|_| Shards::default()).collect();
    for p in set.policies() {
        let action = p.action_constraint();
        let principal = p.principal_constraint();
        for (shard, anc) in shards.iter_mut().zip(ancestry) {
            if !admits(&action, anc) {
                continue;
            }
            let target = match &principal {
                PrincipalConstraint::Eq(u) => shard.principals.entry(u.clone()).or_default(),
                PrincipalConstraint::In(u) | PrincipalConstraint::IsIn(_, u) if u.type_name() == platform => {
                    shard.principals.entry(u.clone()).or_default()
                }
                PrincipalConstraint::In(u) | PrincipalConstraint::IsIn(_, u) => shard.groups.entry(u.clone()).or_default(),
                PrincipalConstraint::Any | PrincipalConstraint::Is(_) => &mut shard.any,
            };
            match (p.template_id(), p.template_links()) {
                (Some(tid), Some(vals)) => {
                    if target.template(tid).is_none()
                        && let Some(t) = set.template(tid)
                    {
                        target.add_template(t.clone())?;
                    }
                    target.link(tid.clone(), p.id().clone(), vals)?;
                }
                _ => target.add(p.clone())?,
            }
        }
    }
    Ok(shards)
}

// ---- platforms --------------------------------------------------------------

#[derive(Default)]
struct PlatformPart {
    by_name: HashMap<String, PlatformEntry>,
}

impl PlatformPart {
    fn build(platforms: Vec<PlatformFacts>) -> PlatformPart {
        PlatformPart { by_name: platforms.into_iter().map(|f| (f.name.clone(), platform_entry(&f))).collect() }
    }
}

// ---- the authorizer -----------------------------------------------------------

/// What the authorizer decides with: swapped whole.
struct Snapshot {
    policies: Arc<PolicyPart>,
    platforms: Arc<PlatformPart>,
}

/// Which policies a request is evaluated against.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scope {
    /// Only the shards of the index that can apply (production).
    Sliced,
    /// The whole set (explain, tests).
    Full,
}

/// Cedar's answer before it becomes a [`Decision`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Determining policy ids, sorted.
    pub reasons: Vec<String>,
    /// Policies skipped because their evaluation failed.
    pub errors: Vec<String>,
}

impl Snapshot {
    /// Cedar's answer to `r` at `time` (seconds since the epoch: the context's `time`).
    fn evaluate(&self, authorizer: &Authorizer, r: &Request<'_>, scope: Scope, time: u64) -> Result<Outcome, String> {
        let p = &self.policies;
        let local = r.principal.local().ok_or_else(|| format!("{} is not a platform", r.principal))?;
        let built;
        let entry = match self.platforms.by_name.get(local) {
            Some(e) => e,
            None => {
                // Not (yet) known to the authorizer: a platform with no role.
                built = platform_entry(&PlatformFacts { name: local.to_string(), ..Default::default() });
                &built
            }
        };
        let ai = Action::ALL.iter().position(|a| *a == r.action).unwrap_or(0);
        let (resource, topic) = if r.action.on_controller() {
            (p.controller.clone(), None)
        } else {
            let t = r.topic.as_ref().ok_or_else(|| format!("{} needs a topic", r.action.name()))?;
            let e = p.topics.topic_entity(t)?;
            (e.uid(), Some(e))
        };
        let principal = entry.entity.uid();
        let entities = Entities::from_entities(
            [entry.entity.clone(), p.actions[ai].clone()].into_iter().chain(topic),
            None,
        )
        .map_err(|e| e.to_string())?;
        let context = Context::from_pairs([
            ("authn".to_string(), RestrictedExpression::new_string(r.context.authn.clone())),
            ("tls_version".to_string(), RestrictedExpression::new_string(r.context.tls_version.to_string())),
            ("source".to_string(), RestrictedExpression::new_string(r.context.source.to_string())),
            ("time".to_string(), RestrictedExpression::new_long(time as i64)),
        ])
        .map_err(|e| e.to_string())?;
        // Full (explain) also checks the request against the schema; production builds it right.
        let schema = (scope == Scope::Full).then_some(&p.schema);
        let request = cedar_policy::Request::new(principal.clone(), p.actions[ai].uid(), resource, context, schema)
            .map_err(|e| e.to_string())?;
        let sets: Vec<&PolicySet> = match scope {
            Scope::Full => vec![&p.set],
            Scope::Sliced => {
                let s = &p.shards[ai];
                std::iter::once(&s.any)
                    .chain(entry.groups.iter().filter_map(|g| s.groups.get(g)))
                    .chain(s.principals.get(&principal))
                    .filter(|s| !s.is_empty())
                    .collect()
            }
        };
        // Forbid wins over permit, so the union of the shards' answers is the
        // answer of the whole set: any satisfied forbid denies, else any permit allows.
        let (mut permits, mut forbids, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for set in sets {
            let resp = authorizer.is_authorized(&request, set, &entities);
            let reasons = resp.diagnostics().reason().map(|id| id.to_string());
            match resp.decision() {
                CedarDecision::Allow => permits.extend(reasons),
                CedarDecision::Deny => forbids.extend(reasons),
            }
            errors.extend(resp.diagnostics().errors().map(|e| e.to_string()));
        }
        let allowed = forbids.is_empty() && !permits.is_empty();
        let mut reasons = if allowed { permits } else { forbids };
        reasons.sort();
        reasons.dedup();
        errors.sort();
        errors.dedup();
        Ok(Outcome { allowed, reasons, errors })
    }

    fn decision(&self, o: &Outcome) -> Decision {
        let honeytoken = o.reasons.iter().any(|id| self.policies.honeytokens.contains(&PolicyId::new(id)));
        Decision { allowed: o.allowed, reasons: o.reasons.clone(), honeytoken }
    }
}

/// What a (re)load produced.
#[derive(Debug, Clone)]
pub struct ReloadReport {
    /// Counts loads: 1 for the first.
    pub generation: u64,
    pub files: usize,
    /// Static policies.
    pub policies: usize,
    pub templates: usize,
    pub links: usize,
    pub warnings: Vec<String>,
    pub elapsed: Duration,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "policy set #{}: {} policies, {} templates, {} links from {} files in {} ms",
            self.generation,
            self.policies,
            self.templates,
            self.links,
            self.files,
            self.elapsed.as_millis()
        )?;
        for w in &self.warnings {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

/// A policy that decided a request, for `policy explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRef {
    pub id: String,
    pub effect: &'static str,
    pub file: PathBuf,
    pub line: usize,
}

/// A decision with the policies behind it.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub decision: Decision,
    pub policies: Vec<PolicyRef>,
    /// Policies skipped because their evaluation failed, or why the request could not be asked.
    pub errors: Vec<String>,
    pub generation: u64,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", if self.decision.allowed { "ALLOW" } else { "DENY" })?;
        if self.decision.honeytoken {
            write!(f, " (honeytoken: an alert is raised)")?;
        }
        writeln!(f)?;
        if self.policies.is_empty() && !self.decision.allowed {
            writeln!(f, "  no policy permits it (default deny)")?;
        }
        for p in &self.policies {
            writeln!(f, "  {:<6} {}  ({}:{})", p.effect, p.id, p.file.display(), p.line)?;
        }
        for e in &self.errors {
            writeln!(f, "  error: {e}")?;
        }
        Ok(())
    }
}

/// The production [`Authorize`]: Cedar policies from a directory, hot-swappable.
pub struct CedarAuthorizer {
    /// None: the shipped policies compiled into the binary.
    dir: Option<PathBuf>,
    state: ArcSwap<Snapshot>,
    authorizer: Authorizer,
    /// One reload at a time, so that generations count up.
    reloading: Mutex<()>,
    memo: Mutex<Memo>,
}

/// The decisions of the current second and snapshot. A publisher asks the same
/// question (platform, action, topic, login) for every item, and Cedar takes
/// tens of microseconds to answer it: on the broker's path, per publish. The
/// key is every input of an evaluation (the request, with the login and the
/// context's `time` in seconds) under one snapshot of policies and platforms,
/// so a remembered decision is exactly the one Cedar would give again.
#[derive(Default)]
struct Memo {
    snapshot: Option<Arc<Snapshot>>,
    second: u64,
    decisions: HashMap<String, Decision>,
}

/// Decisions remembered per second at most (a burst of distinct questions
/// starts the memo again instead of growing it).
const MEMO_MAX: usize = 4096;

impl Memo {
    /// The memo for `snap` at `second`, emptied if either moved on.
    fn at(&mut self, snap: &Arc<Snapshot>, second: u64) -> &mut HashMap<String, Decision> {
        let same = self.second == second && self.snapshot.as_ref().is_some_and(|s| Arc::ptr_eq(s, snap));
        if !same || self.decisions.len() >= MEMO_MAX {
            self.decisions.clear();
            self.snapshot = Some(snap.clone());
            self.second = second;
        }
        &mut self.decisions
    }
}

/// Every input of a request's evaluation, as one string (NUL-separated: no
/// JID, topic name, payload type or mechanism contains a NUL).
fn memo_key(r: &Request<'_>) -> String {
    use std::fmt::Write as _;
    let mut k = String::with_capacity(128);
    let _ = write!(k, "{}\0{}\0{}\0{}\0{}\0", r.principal, r.action.name(), r.context.authn, r.context.tls_version, r.context.source);
    if let Some(t) = &r.topic {
        let _ = write!(k, "topic\0{}\0{}\0", t.name, t.payload_type);
        if let Some(o) = t.owner {
            let _ = write!(k, "{o}");
        }
    }
    k
}

impl CedarAuthorizer {
    /// Loads and validates the policies of `dir`; `platforms` are every account's facts.
    pub fn load(dir: &Path, platforms: Vec<PlatformFacts>) -> Result<Self, PolicyError> {
        let part = PolicyPart::build(&read_dir(dir)?, dir, 1)?;
        Ok(Self::new(Some(dir.to_path_buf()), part, platforms))
    }

    /// The shipped policies, for a grid without a policies directory.
    pub fn load_defaults(platforms: Vec<PlatformFacts>) -> Result<Self, PolicyError> {
        let part = PolicyPart::build(&embedded_sources(), Path::new("policies"), 1)?;
        Ok(Self::new(None, part, platforms))
    }

    fn new(dir: Option<PathBuf>, part: PolicyPart, platforms: Vec<PlatformFacts>) -> Self {
        let snap = Snapshot { policies: Arc::new(part), platforms: Arc::new(PlatformPart::build(platforms)) };
        CedarAuthorizer {
            dir,
            state: ArcSwap::from_pointee(snap),
            authorizer: Authorizer::new(),
            reloading: Mutex::new(()),
            memo: Mutex::new(Memo::default()),
        }
    }

    /// The directory the policies come from (None: the shipped ones).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// What the current set is.
    pub fn report(&self) -> ReloadReport {
        self.state.load().policies.report()
    }

    /// Re-reads the directory; swaps in the new set only if all of it is valid,
    /// else keeps the current one and says where the problems are.
    pub fn reload_policies(&self) -> Result<ReloadReport, PolicyError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.state.load().policies.generation + 1;
        let part = match &self.dir {
            Some(dir) => PolicyPart::build(&read_dir(dir)?, dir, generation)?,
            None => PolicyPart::build(&embedded_sources(), Path::new("policies"), generation)?,
        };
        let part = Arc::new(part);
        let report = part.report();
        self.state.rcu(|cur| Snapshot { policies: part.clone(), platforms: cur.platforms.clone() });
        Ok(report)
    }

    /// Replaces every platform's facts (after provisioning or a revocation).
    pub fn set_platforms(&self, platforms: Vec<PlatformFacts>) {
        let part = Arc::new(PlatformPart::build(platforms));
        self.state.rcu(|cur| Snapshot { policies: cur.policies.clone(), platforms: part.clone() });
    }

    /// Adds or replaces some platforms' facts, keeping the others.
    pub fn update_platforms(&self, changed: Vec<PlatformFacts>) {
        let entries: Vec<(String, PlatformEntry)> = changed.iter().map(|f| (f.name.clone(), platform_entry(f))).collect();
        self.state.rcu(|cur| {
            let mut by_name = cur.platforms.by_name.clone();
            by_name.extend(entries.iter().cloned());
            Snapshot { policies: cur.policies.clone(), platforms: Arc::new(PlatformPart { by_name }) }
        });
    }

    /// Cedar's answer, evaluated against the index or the whole set.
    pub fn evaluate(&self, r: &Request<'_>, scope: Scope) -> Result<Outcome, String> {
        self.state.load().evaluate(&self.authorizer, r, scope, crate::store::now_secs())
    }

    /// The decision and the policies that made it (whole set, with locations).
    pub fn explain(&self, r: &Request<'_>) -> Explanation {
        let snap = self.state.load();
        let generation = snap.policies.generation;
        match snap.evaluate(&self.authorizer, r, Scope::Full, crate::store::now_secs()) {
            Ok(o) => {
                let policies = o
                    .reasons
                    .iter()
                    .map(|id| {
                        let pid = PolicyId::new(id);
                        let origin = snap.policies.origins.get(&pid);
                        let effect = match snap.policies.set.policy(&pid).map(|p| p.effect()) {
                            Some(Effect::Forbid) => "forbid",
                            _ => "permit",
                        };
                        PolicyRef {
                            id: id.clone(),
                            effect,
                            file: origin.map(|o| o.file.clone()).unwrap_or_default(),
                            line: origin.map_or(0, |o| o.line),
                        }
                    })
                    .collect();
                Explanation { decision: snap.decision(&o), policies, errors: o.errors, generation }
            }
            Err(e) => Explanation {
                decision: Decision { allowed: false, reasons: Vec::new(), honeytoken: false },
                policies: Vec::new(),
                errors: vec![e],
                generation,
            },
        }
    }
}

impl Authorize for CedarAuthorizer {
    fn authorize(&self, r: &Request<'_>) -> Decision {
        let snap = self.state.load_full();
        let second = crate::store::now_secs();
        let key = memo_key(r);
        if let Some(d) = self.memo.lock().unwrap_or_else(|p| p.into_inner()).at(&snap, second).get(&key) {
            return d.clone();
        }
        let d = match snap.evaluate(&self.authorizer, r, Scope::Sliced, second) {
            Ok(o) => {
                if !o.errors.is_empty() {
                    tracing::warn!(principal = %r.principal, action = r.action.name(), errors = ?o.errors, "policies failed to evaluate and were skipped");
                }
                snap.decision(&o)
            }
            Err(e) => {
                tracing::warn!(principal = %r.principal, action = r.action.name(), error = %e, "request not askable; denied");
                Decision { allowed: false, reasons: Vec::new(), honeytoken: false }
            }
        };
        self.memo.lock().unwrap_or_else(|p| p.into_inner()).at(&snap, second).insert(key, d.clone());
        d
    }
}

// ---- hot reload -------------------------------------------------------------

/// Keeps the policies directory watched while alive.
pub struct Watcher {
    _debouncer: notify_debouncer_full::Debouncer<notify::RecommendedWatcher, notify_debouncer_full::RecommendedCache>,
}

/// Does this event change what the policies are? Reads (ours included) do not.
fn relevant(e: &notify_debouncer_full::DebouncedEvent) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match e.kind {
        EventKind::Remove(_) => true,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            e.paths.iter().any(|p| kind_of(p).is_some())
        }
        _ => false,
    }
}

/// Watches `dir` (recursively, debounced 200 ms) and reloads the authorizer's
/// policies on every change to a policy file; `on_change` gets each outcome
/// (to log, audit and re-check live subscriptions). Runs on notify's thread.
pub fn watch(
    dir: &Path,
    authorizer: Arc<CedarAuthorizer>,
    on_change: impl Fn(Result<ReloadReport, PolicyError>) + Send + 'static,
) -> Result<Watcher, notify::Error> {
    let mut debouncer = notify_debouncer_full::new_debouncer(
        Duration::from_millis(200),
        None,
        move |res: notify_debouncer_full::DebounceEventResult| match res {
            Ok(events) if events.iter().any(relevant) => on_change(authorizer.reload_policies()),
            Ok(_) => {}
            Err(errors) => tracing::warn!(?errors, "watching the policies directory"),
        },
    )?;
    debouncer.watch(dir, notify::RecursiveMode::Recursive)?;
    Ok(Watcher { _debouncer: debouncer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{Context as Login, Topic};
    use crate::jid::BareJid;

    const IODEF: &str = "urn:ietf:params:xml:ns:iodef-2.0";
    const DHCP: &str = "urn:ietf:params:xml:ns:dhcp-lease";

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
    }

    fn facts(name: &str, roles: &[&str], templates: &[&str], read_only: bool, revoked: bool) -> PlatformFacts {
        PlatformFacts {
            name: name.into(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            templates: templates.iter().map(|s| s.to_string()).collect(),
            read_only,
            revoked,
            org: String::new(),
        }
    }

    fn platforms() -> Vec<PlatformFacts> {
        vec![
            facts("nobody", &[], &[], false, false),
            facts("pub1", &["publisher"], &[], false, false),
            facts("sub1", &["subscriber"], &[], false, false),
            facts("admin1", &["admin"], &[], false, false),
            facts("ro1", &["publisher", "subscriber"], &[], true, false),
            facts("rorole", &["publisher", "read-only"], &[], false, false),
            facts("dhcp1", &[], &["dhcp-server"], false, false),
            facts("ids1", &[], &["ids-sensor"], false, false),
            facts("siem1", &["publisher"], &["siem"], false, false),
            facts("revoked1", &["publisher"], &[], false, true),
            facts("priv1", &["subscriber", "privacy-cleared"], &[], false, false),
        ]
    }

    /// (name, payload type, owner) of the topics the table uses.
    const TOPICS: &[(&str, &str, Option<&str>)] = &[
        ("incidents", IODEF, Some("ids1")),
        ("leases", DHCP, Some("dhcp1")),
        ("dhcp-leases", "", None),
        ("other", "", Some("pub1")),
        ("ro-owned", "", Some("ro1")),
        ("new-plain", "", None),
        ("domain-admin-credentials", IODEF, None),
    ];

    fn jid(local: &str) -> BareJid {
        BareJid::new(local, "grid.test").unwrap()
    }

    fn login(authn: &str) -> Login {
        Login { authn: authn.into(), tls_version: "TLSv1.3", source: "127.0.0.1".parse().unwrap() }
    }

    /// Asks `a` whether `who` may do `action` on `topic` (created by `creator` if
    /// the topic is "new-*": the principal).
    fn ask(a: &CedarAuthorizer, who: &str, action: Action, topic: &str, authn: &str, scope: Scope) -> Result<Outcome, String> {
        let principal = jid(who);
        let ctx = login(authn);
        let (payload_type, owner) = TOPICS
            .iter()
            .find(|t| t.0 == topic)
            .map(|t| (t.1, t.2.map(jid)))
            .unwrap_or((if topic.starts_with("new-iodef") { IODEF } else { "" }, Some(jid(who))));
        let topic = (!action.on_controller()).then_some(Topic { name: topic, payload_type, owner: owner.as_ref() });
        a.evaluate(&Request { principal: &principal, action, topic, context: &ctx }, scope)
    }

    #[test]
    fn shipped_policies_decide_as_documented() {
        use Action::*;
        let a = CedarAuthorizer::load(&shipped(), platforms()).unwrap();
        // (platform, action, topic, authn, allowed, determining policies)
        type Row<'a> = (&'a str, Action, &'a str, &'a str, bool, &'a [&'a str]);
        let table: &[Row] = &[
            // everyone: connect and discover; no role gives nothing more
            ("nobody", Connect, "", "SCRAM-SHA-256", true, &["connect"]),
            ("nobody", Discover, "incidents", "PLAIN", true, &["discover"]),
            ("nobody", Subscribe, "incidents", "PLAIN", false, &[]),
            ("nobody", Publish, "incidents", "PLAIN", false, &[]),
            ("nobody", Create, "new-plain-x", "PLAIN", false, &[]),
            // roles
            ("pub1", Create, "new-plain-x", "PLAIN", true, &["publisher"]),
            ("pub1", Publish, "incidents", "PLAIN", true, &["publisher"]),
            ("pub1", Retract, "incidents", "PLAIN", true, &["publisher"]),
            ("pub1", Subscribe, "incidents", "PLAIN", false, &[]),
            ("sub1", Subscribe, "incidents", "PLAIN", true, &["subscriber"]),
            ("sub1", Retrieve, "leases", "PLAIN", true, &["subscriber"]),
            ("sub1", Publish, "incidents", "PLAIN", false, &[]),
            // personal data in payloads (RFC 8600 §9): only the privacy-cleared role
            ("sub1", ReadPersonalData, "incidents", "PLAIN", false, &[]),
            ("siem1", ReadPersonalData, "incidents", "PLAIN", false, &[]),
            ("priv1", ReadPersonalData, "incidents", "PLAIN", true, &["privacy-cleared"]),
            ("priv1", Subscribe, "incidents", "PLAIN", true, &["subscriber"]),
            // admin only with a certificate (RFC 8600 §8.3.3)
            ("admin1", Admin, "", "cert", true, &["admin"]),
            ("admin1", Admin, "", "SCRAM-SHA-256-PLUS", false, &["admin-requires-cert"]),
            ("pub1", Admin, "", "cert", false, &[]),
            // read-only, by attribute or role, whatever else permits
            ("ro1", Publish, "incidents", "PLAIN", false, &["read-only"]),
            ("ro1", Create, "new-plain-x", "PLAIN", false, &["read-only"]),
            ("ro1", Subscribe, "incidents", "PLAIN", true, &["subscriber"]),
            ("ro1", Configure, "ro-owned", "PLAIN", false, &["read-only"]),
            ("ro1", ManageSubscriptions, "ro-owned", "PLAIN", true, &["owner"]),
            ("rorole", Publish, "other", "PLAIN", false, &["read-only"]),
            // functional templates
            ("dhcp1", Publish, "leases", "PLAIN", true, &["dhcp-server", "owner"]),
            ("dhcp1", Publish, "dhcp-leases", "PLAIN", true, &["dhcp-server"]),
            ("dhcp1", Publish, "incidents", "PLAIN", false, &[]),
            ("dhcp1", Subscribe, "leases", "PLAIN", true, &["owner"]),
            ("ids1", Create, "new-iodef-x", "PLAIN", true, &["ids-sensor"]),
            ("ids1", Create, "new-plain-x", "PLAIN", false, &[]),
            ("ids1", Publish, "incidents", "PLAIN", true, &["ids-sensor", "owner"]),
            ("siem1", Subscribe, "incidents", "PLAIN", true, &["siem"]),
            ("siem1", Retrieve, "incidents", "PLAIN", true, &["siem"]),
            ("siem1", Subscribe, "leases", "PLAIN", false, &[]),
            ("siem1", Publish, "incidents", "PLAIN", false, &["siem-read-only"]),
            // owners manage their own topics only
            ("pub1", Configure, "other", "PLAIN", true, &["owner"]),
            ("pub1", Delete, "other", "PLAIN", true, &["owner"]),
            ("pub1", Purge, "other", "PLAIN", true, &["owner"]),
            ("pub1", ManageSubscriptions, "other", "PLAIN", true, &["owner"]),
            ("sub1", Configure, "other", "PLAIN", false, &[]),
            ("pub1", Delete, "incidents", "PLAIN", false, &[]),
            ("nobody", ManageSubscriptions, "other", "PLAIN", false, &[]),
            // honeytokens: denied, discoverable
            ("sub1", Subscribe, "domain-admin-credentials", "PLAIN", false, &["honeytoken-trap"]),
            ("pub1", Publish, "domain-admin-credentials", "PLAIN", false, &["honeytoken-trap"]),
            ("siem1", Retrieve, "domain-admin-credentials", "PLAIN", false, &["honeytoken-trap"]),
            ("nobody", Discover, "domain-admin-credentials", "PLAIN", true, &["discover"]),
            // revoked: nothing
            ("revoked1", Connect, "", "cert", false, &["revoked"]),
            ("revoked1", Publish, "other", "PLAIN", false, &["revoked"]),
            // unknown to the authorizer: a platform with no role
            ("stranger", Connect, "", "PLAIN", true, &["connect"]),
            ("stranger", Subscribe, "incidents", "PLAIN", false, &[]),
        ];
        for (who, action, topic, authn, allowed, reasons) in table {
            for scope in [Scope::Sliced, Scope::Full] {
                let o = ask(&a, who, *action, topic, authn, scope).unwrap();
                let want: Vec<String> = reasons.iter().map(|s| s.to_string()).collect();
                assert_eq!(
                    (o.allowed, &o.reasons, &o.errors),
                    (*allowed, &want, &Vec::new()),
                    "{who} {} {topic} ({authn}, {scope:?})",
                    action.name()
                );
            }
        }
    }

    #[test]
    fn a_honeytoken_denial_carries_the_alert_flag() {
        let a = CedarAuthorizer::load(&shipped(), platforms()).unwrap();
        let (p, ctx) = (jid("sub1"), login("PLAIN"));
        let topic = |name| Some(Topic { name, payload_type: IODEF, owner: None });
        let d = a.authorize(&Request { principal: &p, action: Action::Subscribe, topic: topic("domain-admin-credentials"), context: &ctx });
        assert_eq!(d, Decision { allowed: false, reasons: vec!["honeytoken-trap".into()], honeytoken: true });
        let d = a.authorize(&Request { principal: &p, action: Action::Discover, topic: topic("domain-admin-credentials"), context: &ctx });
        assert!(d.allowed && !d.honeytoken);
        let d = a.authorize(&Request { principal: &p, action: Action::Subscribe, topic: topic("incidents"), context: &ctx });
        assert!(d.allowed && !d.honeytoken);
    }

    #[test]
    fn remembered_decisions_are_cedars_own_and_follow_every_change_at_once() {
        let d = copy_shipped("memo");
        let a = CedarAuthorizer::load(&d, platforms()).unwrap();
        let names: Vec<String> = platforms().into_iter().map(|f| f.name).collect();
        // Asked twice (the second time from the memo), every answer is Cedar's.
        for round in 0..2 {
            for who in &names {
                for action in Action::ALL {
                    for (topic, payload_type, owner) in TOPICS {
                        for authn in ["PLAIN", "cert"] {
                            let (principal, ctx, owner) = (jid(who), login(authn), owner.map(jid));
                            let t = (!action.on_controller()).then_some(Topic { name: topic, payload_type, owner: owner.as_ref() });
                            let r = Request { principal: &principal, action, topic: t, context: &ctx };
                            let cedar = a.evaluate(&r, Scope::Sliced).map(|o| (o.allowed, o.reasons)).unwrap_or((false, vec![]));
                            let got = a.authorize(&r);
                            assert_eq!((got.allowed, got.reasons), cedar, "round {round}: {who} {action:?} {topic} {authn}");
                        }
                    }
                }
            }
        }
        let (p, ctx, owner) = (jid("pub1"), login("PLAIN"), jid("pub1"));
        let r = Request { principal: &p, action: Action::Publish, topic: Some(Topic { name: "other", payload_type: "", owner: Some(&owner) }), context: &ctx };
        assert!(a.authorize(&r).allowed);
        // A revoked platform is refused by the next request, not a second later.
        a.update_platforms(vec![facts("pub1", &["publisher"], &[], false, true)]);
        assert!(!a.authorize(&r).allowed);
        a.update_platforms(vec![facts("pub1", &["publisher"], &[], false, false)]);
        assert!(a.authorize(&r).allowed);
        // So is a new forbid.
        std::fs::write(d.join("zz-stop.cedar"), "@id(\"stop\")\nforbid(principal, action, resource);\n").unwrap();
        a.reload_policies().unwrap();
        assert_eq!(a.authorize(&r).reasons, vec!["stop".to_string()]);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn explain_names_the_deciding_policies_with_their_lines() {
        let a = CedarAuthorizer::load(&shipped(), platforms()).unwrap();
        let (p, ctx) = (jid("ro1"), login("PLAIN"));
        let e = a.explain(&Request {
            principal: &p,
            action: Action::Publish,
            topic: Some(Topic { name: "incidents", payload_type: IODEF, owner: None }),
            context: &ctx,
        });
        assert!(!e.decision.allowed);
        assert_eq!(e.policies.len(), 1);
        let r = &e.policies[0];
        assert_eq!((r.id.as_str(), r.effect), ("read-only", "forbid"));
        assert!(r.file.ends_with("roles.cedar"));
        let text = std::fs::read_to_string(&r.file).unwrap();
        assert!(text.lines().nth(r.line - 1).unwrap().contains("@id(\"read-only\")"), "line {}", r.line);
        assert!(e.to_string().starts_with("DENY\n  forbid read-only"), "{e}");
        // A broker action without a topic cannot be asked: denied, with the reason.
        let e = a.explain(&Request { principal: &p, action: Action::Publish, topic: None, context: &ctx });
        assert!(!e.decision.allowed && e.errors[0].contains("needs a topic"));
    }

    #[test]
    fn the_embedded_defaults_are_the_shipped_files_and_install_once() {
        for (name, text) in DEFAULT_POLICIES {
            assert_eq!(std::fs::read_to_string(shipped().join(name)).unwrap(), *text, "{name}");
        }
        assert!(CedarAuthorizer::load_defaults(vec![]).is_ok());
        let d = temp_dir("install");
        assert_eq!(install_defaults(&d).unwrap().len(), DEFAULT_POLICIES.len());
        assert!(install_defaults(&d).unwrap().is_empty());
        assert!(CedarAuthorizer::load(&d, vec![]).is_ok());
        std::fs::remove_dir_all(&d).ok();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xg-authz-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn copy_shipped(name: &str) -> PathBuf {
        let d = temp_dir(name);
        for (file, text) in DEFAULT_POLICIES {
            std::fs::write(d.join(file), text).unwrap();
        }
        d
    }

    fn problem_at(e: &PolicyError, file: &str) -> Problem {
        e.problems.iter().find(|p| p.file.ends_with(file)).cloned().unwrap_or_else(|| panic!("no problem in {file}: {e}"))
    }

    #[test]
    fn broken_files_are_refused_with_their_location() {
        let d = copy_shipped("broken");
        let a = CedarAuthorizer::load(&d, platforms()).unwrap();
        let cases: &[(&str, &str, (usize, usize), &str)] = &[
            ("syntax.cedar", "// x\n@id(\"s\")\npermit(principal, action, resource) when { };\n", (3, 37), "cannot be empty"),
            ("typo.cedar", "@id(\"t\")\npermit(principal, action, resource is Grid::Topic)\n  when { resource.honeytokn };\n", (3, 10), "honeytokn"),
            ("action.cedar", "@id(\"a\")\npermit(principal, action == Grid::Action::\"publsh\", resource);\n", (2, 29), "publsh"),
            ("dup.cedar", "@id(\"connect\")\npermit(principal, action, resource);\n", (1, 1), "connect"),
            ("topics.toml", "honeytokens = [\"x\"]\n[kinds]\nfoo = 3\n", (3, 7), "string"),
            ("links.toml", "[[link]]\ntemplate = \"nope\"\nprincipal = \"p\"\n", (1, 1), "nope"),
        ];
        for (file, text, (line, col), needle) in cases {
            let path = d.join(file);
            let old = std::fs::read_to_string(&path).ok();
            std::fs::write(&path, text).unwrap();
            let e = a.reload_policies().expect_err(file);
            let p = problem_at(&e, file);
            assert_eq!((p.line, p.col), (*line, *col), "{file}: {e}");
            assert!(p.message.contains(needle) && e.to_string().contains(&format!("{file}:{line}:{col}: ")), "{file}: {e}");
            match old {
                Some(old) => std::fs::write(&path, old).unwrap(),
                None => std::fs::remove_file(&path).unwrap(),
            }
        }
        assert_eq!(a.reload_policies().unwrap().generation, 2);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn links_give_one_platform_a_template() {
        let d = copy_shipped("links");
        std::fs::write(d.join("links.toml"), "[[link]]\ntemplate = \"tpl-read\"\nprincipal = \"nobody\"\nkind = \"incident\"\n").unwrap();
        let a = CedarAuthorizer::load(&d, platforms()).unwrap();
        assert_eq!(a.report().links, 1);
        for scope in [Scope::Sliced, Scope::Full] {
            let o = ask(&a, "nobody", Action::Subscribe, "incidents", "PLAIN", scope).unwrap();
            assert_eq!((o.allowed, o.reasons), (true, vec!["tpl-read/nobody/incident".to_string()]));
            assert!(!ask(&a, "pub1", Action::Subscribe, "incidents", "PLAIN", scope).unwrap().allowed);
        }
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn platforms_are_swapped_whole_or_updated() {
        let a = CedarAuthorizer::load(&shipped(), platforms()).unwrap();
        assert!(ask(&a, "pub1", Action::Publish, "other", "PLAIN", Scope::Sliced).unwrap().allowed);
        a.update_platforms(vec![facts("pub1", &["publisher"], &[], false, true)]);
        assert!(!ask(&a, "pub1", Action::Publish, "other", "PLAIN", Scope::Sliced).unwrap().allowed);
        assert!(ask(&a, "sub1", Action::Subscribe, "other", "PLAIN", Scope::Sliced).unwrap().allowed);
        a.set_platforms(vec![]);
        assert!(!ask(&a, "sub1", Action::Subscribe, "other", "PLAIN", Scope::Sliced).unwrap().allowed);
    }

    /// Polls `f` for up to `secs` seconds.
    fn within(secs: u64, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn edits_take_effect_within_two_seconds_and_broken_ones_keep_the_old_set() {
        let d = copy_shipped("watch");
        let a = Arc::new(CedarAuthorizer::load(&d, platforms()).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let _w = watch(&d, a.clone(), move |r| {
            let _ = tx.send(r);
        })
        .unwrap();
        let reads = |a: &CedarAuthorizer| ask(a, "nobody", Action::Subscribe, "incidents", "PLAIN", Scope::Sliced).unwrap().allowed;
        assert!(!reads(&a));

        let start = Instant::now();
        std::fs::write(d.join("extra.cedar"), "@id(\"everyone-reads\")\npermit(principal, action in Grid::Action::\"read\", resource);\n").unwrap();
        assert!(within(2, || reads(&a)), "not reloaded within 2 s");
        let ok = rx.recv_timeout(Duration::from_secs(2)).unwrap().unwrap();
        assert!(ok.generation >= 2 && start.elapsed() < Duration::from_secs(2));

        std::fs::write(d.join("broken.cedar"), "@id(\"b\")\npermit(principal, action, resource) when { resource.nope };\n").unwrap();
        let err = loop {
            match rx.recv_timeout(Duration::from_secs(2)).expect("no reload after the broken file") {
                Err(e) => break e,
                Ok(_) => continue,
            }
        };
        let p = problem_at(&err, "broken.cedar");
        assert_eq!((p.line, p.col), (2, 44), "{err}");
        assert!(reads(&a), "the last good set stays");

        std::fs::remove_file(d.join("broken.cedar")).unwrap();
        std::fs::remove_file(d.join("extra.cedar")).unwrap();
        assert!(within(2, || !reads(&a)), "removal not applied within 2 s");
        std::fs::remove_dir_all(&d).ok();
    }

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 33) as usize % n
        }
    }

    #[test]
    fn the_index_decides_like_the_whole_set() {
        let d = copy_shipped("index");
        let mut orgs = String::new();
        for i in 0..20 {
            orgs.push_str(&format!(
                "@id(\"org{i}-reads\")\npermit(principal in Grid::Role::\"org{i}\", action in Grid::Action::\"read\", resource)\n  when {{ resource.tags.contains(\"org{i}\") }};\n\
                 @id(\"org{i}-attr\")\npermit(principal, action == Grid::Action::\"publish\", resource) when {{ principal.org == \"org{i}\" && resource has owner && resource.owner.org == \"org{i}\" }};\n\
                 @id(\"org{i}-deny\")\nforbid(principal in Grid::Role::\"org{i}\", action == Grid::Action::\"delete\", resource);\n"
            ));
        }
        std::fs::write(d.join("orgs.cedar"), orgs).unwrap();
        let mut topics = String::from(DEFAULT_POLICIES.iter().find(|f| f.0 == "topics.toml").unwrap().1);
        for i in 0..20 {
            topics.push_str(&format!("[topics.\"t{i}-*\"]\ntags = [\"org{i}\"]\n"));
        }
        std::fs::write(d.join("topics.toml"), topics).unwrap();
        let mut links = String::new();
        for i in 0..30 {
            links.push_str(&format!("[[link]]\ntemplate = \"tpl-{}\"\nprincipal = \"p{i}\"\ntopic = \"t{}-x\"\n", ["read", "publish"][i % 2], i % 20));
        }
        std::fs::write(d.join("links.toml"), links).unwrap();

        let mut rng = Rng(0x9E3779B97F4A7C15);
        let roles = ["publisher", "subscriber", "admin", "read-only", "org1", "org2", "org3"];
        let templates = ["dhcp-server", "ids-sensor", "siem"];
        let mut ps: Vec<PlatformFacts> = (0..60)
            .map(|i| PlatformFacts {
                name: format!("p{i}"),
                roles: (0..rng.below(3)).map(|_| roles[rng.below(roles.len())].to_string()).collect(),
                templates: (0..rng.below(2)).map(|_| templates[rng.below(templates.len())].to_string()).collect(),
                read_only: rng.below(5) == 0,
                revoked: rng.below(20) == 0,
                org: format!("org{}", rng.below(4)),
            })
            .collect();
        ps.extend(platforms());
        let a = CedarAuthorizer::load(&d, ps.clone()).unwrap();
        let topic_names: Vec<String> = (0..20)
            .map(|i| format!("t{i}-x"))
            .chain(TOPICS.iter().map(|t| t.0.to_string()))
            .chain(["new-iodef-1".to_string()])
            .collect();
        let authns = ["cert", "PLAIN", "SCRAM-SHA-256-PLUS"];
        let (mut allowed, n) = (0, 3000);
        for _ in 0..n {
            let who = &ps[rng.below(ps.len())].name;
            let action = Action::ALL[rng.below(Action::ALL.len())];
            let topic = &topic_names[rng.below(topic_names.len())];
            let owner = jid(&ps[rng.below(ps.len())].name);
            let payload = [IODEF, DHCP, ""][rng.below(3)];
            let (p, ctx) = (jid(who), login(authns[rng.below(3)]));
            let t = (!action.on_controller()).then_some(Topic { name: topic, payload_type: payload, owner: (rng.below(4) > 0).then_some(&owner) });
            let r = Request { principal: &p, action, topic: t, context: &ctx };
            let (sliced, full) = (a.evaluate(&r, Scope::Sliced).unwrap(), a.evaluate(&r, Scope::Full).unwrap());
            assert_eq!(sliced, full, "{who} {} {topic}", action.name());
            allowed += sliced.allowed as usize;
        }
        assert!(allowed > n / 10 && allowed < n * 9 / 10, "a mix of decisions: {allowed}/{n}");
        std::fs::remove_dir_all(&d).ok();
    }
}
