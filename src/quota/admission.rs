//! Quotas and budgets on the request path: who is calling, what the request
//! reserves, whether it is admitted, and what it finally cost.
//!
//! The listener half calls `identify` when headers arrive, `admit` once the
//! body is read and the targets are chosen, and `settle` when the request is
//! over (answered, failed or abandoned), so every reservation is reconciled
//! exactly once. The counting itself lives in `buckets`, over shared data.

use std::rc::Rc;

use crate::access::identity::{Caller, IdentityError};
use crate::config::names::Target;
use crate::config::Config;
use crate::core::api_error::ApiError;
use crate::core::schema::Schema;
use crate::core::usage::Usage;
use crate::host::{CalloutAnswer, CalloutId, Host};
use crate::metrics;
use crate::quota::buckets::{self, Amounts, Held, Limit, Meter, Refusal, Standing, Update};
use crate::quota::lease::{self, Take};
use crate::quota::limits::{
    limit_field, tag_value, Facts, LimitRule, ModelScope, ReservationPolicy, Selector,
    DEFAULT_ALERTS,
};
use crate::quota::pricing::{cost_micro_usd, Prices};
use crate::quota::store::{self, Counter, FailureMode, Reply};

/// Who called and which attribution tags the request carries.
#[derive(Debug, Clone, Default)]
pub struct Who {
    pub caller: Option<Caller>,
    /// (tag index, sanitised value).
    pub tags: Vec<(usize, String)>,
}

impl Who {
    /// (namespace, service) for metrics; `unknown` when not identified.
    pub fn names(&self) -> (&str, &str) {
        match &self.caller {
            Some(c) => (c.namespace.as_str(), c.service.as_str()),
            None => ("unknown", "unknown"),
        }
    }

    /// `namespace/service` for logs, or `-` when callers are not identified.
    pub fn label(&self) -> String {
        match &self.caller {
            Some(c) => format!("{}/{}", c.namespace, c.service),
            None => "-".into(),
        }
    }
}

/// Reads the caller's identity and tags; removes the headers that carried
/// them so they never reach a provider. Must run before client credentials
/// are stripped (a virtual key is one).
pub fn identify(config: &Config, host: &mut dyn Host) -> Result<Who, ApiError> {
    let caller = match &config.identity {
        None => None,
        Some(policy) => {
            let resolved = policy.resolve(&*host);
            if let Some(name) = policy.header() {
                if host.request_header(name).is_some() {
                    host.remove_request_header(name).map_err(|e| {
                        ApiError::new(
                            500,
                            "server_error",
                            Some("gateway_error"),
                            format!("Gateway error: could not remove the identity header: {e}."),
                        )
                    })?;
                }
            }
            match resolved {
                Ok(c) => Some(c),
                Err(IdentityError::UnknownKey) => {
                    return Err(ApiError::new(
                        401,
                        "invalid_request_error",
                        Some("invalid_api_key"),
                        "Incorrect API key provided: this gateway does not know the key.".into(),
                    ))
                }
                Err(IdentityError::Unidentified(why)) => {
                    return Err(ApiError::new(
                        403,
                        "permission_error",
                        Some("unidentified_caller"),
                        format!("The gateway could not identify the caller: {why}."),
                    ))
                }
            }
        }
    };
    let mut tags = Vec::new();
    for (i, tag) in config.tags.iter().enumerate() {
        if let Some(v) = host.request_header(&tag.header) {
            tags.push((i, tag_value(&v).to_string()));
            let _ = host.remove_request_header(&tag.header);
        }
    }
    Ok(Who { caller, tags })
}

/// Creates the buckets known before any request, so that every write at
/// request time is compare-and-swapped (a missing key cannot be).
pub fn prepare_buckets(config: &Config, store: &mut dyn crate::host::SharedData) {
    let mesh = config.quotas.iter().flat_map(|p| p.rules.iter());
    let namespaces = config.namespaces.values().flat_map(|p| p.rules.iter());
    for rule in mesh.chain(namespaces) {
        for key in rule.known_buckets(config.models.iter().map(|m| m.name.as_str())) {
            buckets::ensure(store, &key);
            if rule.lease.is_some() {
                lease::ensure(store, &key);
            }
        }
    }
}

/// The rules that apply to a request: the mesh's, then its namespace's.
fn rules<'a>(
    config: &'a Config,
    namespace: &'a [Rc<LimitRule>],
) -> impl Iterator<Item = &'a Rc<LimitRule>> {
    config
        .quotas
        .iter()
        .flat_map(|p| p.rules.iter())
        .chain(namespace)
}

/// The mesh's reservation policy and alert thresholds (the defaults when
/// only namespaces set rules).
fn settings(config: &Config) -> (ReservationPolicy, &[u32]) {
    match &config.quotas {
        Some(p) => (p.reservation, &p.alert_percents),
        None => (ReservationPolicy::default(), DEFAULT_ALERTS),
    }
}

/// The model a budget rule switches this request to, if one has passed its
/// threshold: (new model, rule name). A rule whose replacement the caller
/// may not use (`allowed` says no) does not apply. `downgrade.models` is
/// matched by what the asked name denotes (an alias of a listed model is
/// that model), and the threshold is read in the rule's bucket for this
/// caller: a rule on a model reads that model's, a `"*"` rule the bucket of
/// each model the name may be served by.
pub fn downgrade(
    config: &Config,
    host: &dyn Host,
    who: &Who,
    model: &str,
    namespace_rules: &[Rc<LimitRule>],
    allowed: &dyn Fn(&str) -> bool,
) -> Option<(String, String)> {
    let now = host.now_unix_millis();
    let asked = config.route(model).map_or(model, |m| m.name.as_str());
    rules(config, namespace_rules).find_map(|rule| {
        let d = rule.downgrade.as_ref()?;
        let to = d.models.get(asked).filter(|to| allowed(to))?;
        let facts = |model| Facts {
            caller: who.caller.as_ref(),
            model,
            tags: &who.tags,
        };
        let keys: Vec<String> = match (rule.scope, &rule.matcher.model) {
            (ModelScope::EachModel, _) => served_by(config, asked)
                .iter()
                .filter_map(|&m| rule.bucket(&facts(&config.models[m].name)))
                .collect(),
            (_, Selector::Is(bound)) => rule.bucket(&facts(bound)).into_iter().collect(),
            _ => rule.bucket(&facts(asked)).into_iter().collect(),
        };
        let over = keys.iter().any(|key| {
            buckets::standings(host, key, &rule.limits, now)
                .iter()
                .any(|s| buckets::percent(s.used, s.limit.max) >= d.at_percent)
        });
        over.then(|| (to.clone(), rule.name.clone()))
    })
}

/// The models a document name (a model's or a route's) may be served by.
fn served_by(config: &Config, name: &str) -> Vec<usize> {
    match config.target(name) {
        Some(Target::Model(i)) => vec![i],
        Some(Target::Route(j)) => config.routes[j].targets.iter().map(|t| t.model).collect(),
        None => Vec::new(),
    }
}

/// What an admitted request holds until it is settled.
#[derive(Debug, Clone)]
pub struct Admission {
    held: Vec<Hold>,
    /// Reservations in the shared store (settled by a detached call).
    shared: Vec<SharedHold>,
    /// The store's answer is awaited before the request may go on.
    waiting: Option<Waiting>,
    /// The targets that may serve, in attempt order (what `admit` kept).
    chain: Vec<usize>,
    prompt_estimate: u64,
    output_estimate: u64,
    bytes_per_token: u64,
    /// Headers for the caller's answer: rate-limit state and budget alerts.
    pub headers: Vec<(String, String)>,
}

/// A reservation in the shared store: one counter per limit of a bucket.
#[derive(Debug, Clone)]
struct SharedHold {
    rule: Rc<LimitRule>,
    key: String,
    targets: Option<Vec<usize>>,
    counters: Vec<Counter>,
    leasing: Leasing,
}

/// How a shared hold is reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Leasing {
    /// Exact mode: in the store, by the request's own call.
    No,
    /// From this proxy's lease, without a call; `seen` per counter (the
    /// store's count at the last answer) for the headers.
    Taken { seen: Vec<u64> },
    /// The lease could not cover it: asked of the store in the request's
    /// call, with a lease for the proxy (`wanted` per counter) when this
    /// worker was elected to refill.
    Asking { wanted: Option<Vec<u64>> },
}

impl SharedHold {
    /// Part of the request's store call.
    fn asked(&self) -> bool {
        !matches!(self.leasing, Leasing::Taken { .. })
    }
}

/// A reservation sent to the store, until its answer comes.
#[derive(Debug, Clone)]
struct Waiting {
    call: CalloutId,
    /// The script went whole (Redis did not have it).
    whole_script: bool,
    /// The call is a `lease` command (some hold leases), else `reserve`.
    leasing: bool,
    schema: Schema,
    /// The local buckets' standings, for the answer's headers.
    local_shown: Vec<(Rc<LimitRule>, Standing)>,
    reserved_at_ms: u64,
}

#[derive(Debug, Clone)]
struct Hold {
    rule: Rc<LimitRule>,
    key: String,
    held: Held,
    /// None: the request as a whole; Some: only these targets (a model's
    /// rule, or a named route's), so it is charged when one of them is tried.
    targets: Option<Vec<usize>>,
}

/// A refused request: the error and the headers that go with it.
pub struct Rejection {
    pub error: ApiError,
    pub headers: Vec<(String, String)>,
    /// The rule that refused, for metrics.
    pub rule: String,
    pub reason: &'static str,
}

/// The request's shape, for the reservation estimate.
pub struct Ask<'a> {
    pub body_len: usize,
    /// The most output the request asks for (`max_tokens` and kin).
    pub max_output: Option<u64>,
    /// Candidate targets (indices into `Config::models`) in attempt order,
    /// before quotas: every model rule binds the positions of its model.
    pub chain: &'a [usize],
    /// The routes the request names (its model, `x-meshllm-models`), after
    /// namespace aliases (indices into `Config::routes`).
    pub routes: &'a [usize],
    /// At most this many targets are kept (failover's `max_attempts`).
    pub max_targets: usize,
    pub caller_schema: Schema,
}

/// What admission let through.
pub struct Admitted {
    /// The targets that may serve, in attempt order: the candidates without
    /// those a limit refused, at most `max_targets`.
    pub chain: Vec<usize>,
    /// Candidates dropped because a limit bound to them refused, in order.
    pub over_quota: Vec<usize>,
    /// None when no limit applies to the request.
    pub admission: Option<Admission>,
}

/// One bucket a request may draw from, before it is reserved.
struct Binding<'a> {
    rule: &'a Rc<LimitRule>,
    key: String,
    /// As in [`Hold::targets`].
    targets: Option<Vec<usize>>,
    amounts: Amounts,
}

/// Where a target-bound bucket stands while the chain is walked.
enum Reserved {
    Not,
    Held(buckets::Admission),
    Refused,
}

/// Admission. Every rule whose `match` fits the caller binds either the
/// request as a whole (no `match.model`) or the targets its model or route
/// stands for. Target by target, in chain order, the estimate is reserved
/// in the buckets bound to that target; a target whose bucket refuses is
/// dropped (the request may still be served by the others). Then the
/// request-wide buckets are reserved, all or nothing. Refused as a whole
/// when no target is left or a request-wide limit would be passed: nothing
/// stays reserved anywhere.
pub fn admit(
    config: &Config,
    host: &mut dyn Host,
    who: &Who,
    ask: &Ask,
    namespace_rules: &[Rc<LimitRule>],
) -> Result<Admitted, Box<Rejection>> {
    let now = host.now_unix_millis();
    let (reservation, alert_percents) = settings(config);
    let (prompt, output) = reservation.estimate(ask.body_len, ask.max_output);
    let estimate = Usage {
        input_tokens: prompt,
        output_tokens: output,
        cached_input_tokens: 0,
        reasoning_tokens: 0,
    };
    // Dollars at the most expensive of the targets a bucket may pay for.
    let amounts = |targets: &mut dyn Iterator<Item = usize>| Amounts {
        requests: 1,
        tokens: prompt + output,
        micro_usd: targets
            .filter_map(|m| prices_of(config, m))
            .map(|p| cost_micro_usd(&p, &estimate))
            .max()
            .unwrap_or(0),
    };
    let bindings = bindings(config, who, ask, namespace_rules, &amounts);
    let store = config.store();
    let (shared, bindings): (Vec<Binding>, Vec<Binding>) = bindings
        .into_iter()
        .partition(|b| store.is_some() && b.rule.shared.is_some());
    if bindings.is_empty() && shared.is_empty() {
        return Ok(Admitted {
            chain: ask.chain.iter().copied().take(ask.max_targets).collect(),
            over_quota: Vec::new(),
            admission: None,
        });
    }
    let (request_wide, bound): (Vec<Binding>, Vec<Binding>) =
        bindings.into_iter().partition(|b| b.targets.is_none());

    // Target by target: a target keeps the reservations of its buckets.
    let mut states: Vec<Reserved> = bound.iter().map(|_| Reserved::Not).collect();
    let mut refusals: Vec<(usize, Refusal)> = Vec::new();
    let mut chain = Vec::with_capacity(ask.max_targets.min(ask.chain.len()));
    let mut over_quota = Vec::new();
    for &target in ask.chain {
        if chain.len() >= ask.max_targets {
            break;
        }
        let binds = |b: &Binding| b.targets.as_ref().is_some_and(|t| t.contains(&target));
        let mine: Vec<usize> = (0..bound.len()).filter(|&i| binds(&bound[i])).collect();
        if mine.iter().any(|&i| matches!(states[i], Reserved::Refused)) {
            over_quota.push(target);
            continue;
        }
        let todo: Vec<usize> = mine
            .into_iter()
            .filter(|&i| matches!(states[i], Reserved::Not))
            .collect();
        let buckets: Vec<(&str, &[Limit], &Amounts)> = todo
            .iter()
            .map(|&i| {
                (
                    bound[i].key.as_str(),
                    bound[i].rule.limits.as_slice(),
                    &bound[i].amounts,
                )
            })
            .collect();
        match buckets::reserve_all(host, &buckets, now) {
            Ok(reserved) => {
                for (&i, r) in todo.iter().zip(reserved) {
                    states[i] = Reserved::Held(r);
                }
                chain.push(target);
            }
            Err((index, refusal)) => {
                if let Some(&i) = todo.get(index) {
                    states[i] = Reserved::Refused;
                    refusals.push((i, refusal));
                }
                over_quota.push(target);
            }
        }
    }
    let release = |host: &mut dyn Host, states: &[Reserved]| {
        for state in states {
            if let Reserved::Held(r) = state {
                buckets::settle(host, &r.held, &Amounts::default(), now);
            }
        }
    };
    if chain.is_empty() {
        release(host, &states);
        let (i, refusal) = first_to_clear(&refusals).ok_or_else(|| {
            Box::new(rejection(
                ask.caller_schema,
                "",
                &Refusal::Busy,
                &Amounts::default(),
                now,
            ))
        })?;
        let b = &bound[i];
        return Err(Box::new(rejection(
            ask.caller_schema,
            &b.rule.name,
            &refusal,
            &b.amounts,
            now,
        )));
    }

    // The request as a whole, priced at the dearest target it may reach.
    let whole = amounts(&mut chain.iter().copied());
    let buckets: Vec<(&str, &[Limit], &Amounts)> = request_wide
        .iter()
        .map(|b| (b.key.as_str(), b.rule.limits.as_slice(), &whole))
        .collect();
    let reserved = match buckets::reserve_all(host, &buckets, now) {
        Ok(reserved) => reserved,
        Err((index, refusal)) => {
            release(host, &states);
            let name = request_wide.get(index).map_or("", |b| b.rule.name.as_str());
            return Err(Box::new(rejection(
                ask.caller_schema,
                name,
                &refusal,
                &whole,
                now,
            )));
        }
    };

    let mut held: Vec<(Binding, buckets::Admission)> =
        request_wide.into_iter().zip(reserved).collect();
    held.extend(
        bound
            .into_iter()
            .zip(states)
            .filter_map(|(b, state)| match state {
                Reserved::Held(r) => Some((b, r)),
                _ => None,
            }),
    );
    for (b, r) in &held {
        for u in r.updates.iter().enumerate() {
            report(host, alert_percents, b.rule, &b.key, who, u);
        }
    }
    // The caller's headers: its request-wide limits and those bound to the
    // target it is sent to first (whichever name led there).
    let first = chain.first().copied();
    let shown: Vec<(Rc<LimitRule>, Standing)> = held
        .iter()
        .filter(|(b, _)| shows(&b.targets, first))
        .flat_map(|(b, r)| {
            r.updates
                .iter()
                .map(move |u| (Rc::clone(b.rule), u.standing))
        })
        .collect();
    let held: Vec<Hold> = held
        .into_iter()
        .map(|(b, r)| Hold {
            rule: Rc::clone(b.rule),
            key: b.key,
            held: r.held,
            targets: b.targets,
        })
        .collect();
    let shared: Vec<SharedHold> = shared
        .into_iter()
        .filter_map(|b| {
            let amounts = match &b.targets {
                None => whole,
                Some(t) if t.iter().any(|m| chain.contains(m)) => b.amounts,
                Some(_) => return None,
            };
            let counters = store::counters(&b.key, &b.rule.limits, |m| amounts.of(m), now);
            Some(SharedHold {
                rule: Rc::clone(b.rule),
                key: b.key,
                targets: b.targets,
                counters,
                leasing: Leasing::No,
            })
        })
        .collect();
    let mut admission = Admission {
        held,
        shared: Vec::new(),
        waiting: None,
        chain: chain.clone(),
        prompt_estimate: prompt,
        output_estimate: output,
        bytes_per_token: reservation.bytes_per_token.max(1),
        headers: Vec::new(),
    };
    if let Some(store) = store.filter(|_| !shared.is_empty()) {
        // A reservation larger than a limit is refused without asking.
        for hold in &shared {
            if let Some(c) = hold.counters.iter().find(|c| c.reserved > c.limit.max) {
                let refusal = Refusal::TooLarge {
                    limit: c.limit,
                    requested: c.reserved,
                };
                release_all(host, &mut admission, now);
                let asked = asked_of(&hold.counters);
                return Err(Box::new(rejection(
                    ask.caller_schema,
                    &hold.rule.name,
                    &refusal,
                    &asked,
                    now,
                )));
            }
        }
        let mut shared = shared;
        let full = take_leases(host, store, &mut shared, now);
        admission.shared = shared;
        if let Some((at, standing)) = full {
            // The store refused this much a moment ago: refused here.
            let (name, asked) = admission
                .shared
                .get(at)
                .map_or((String::new(), Amounts::default()), |h| {
                    (h.rule.name.clone(), asked_of(&h.counters))
                });
            release_all(host, &mut admission, now);
            return Err(Box::new(rejection(
                ask.caller_schema,
                &name,
                &Refusal::Exceeded { standing },
                &asked,
                now,
            )));
        }
        if !admission.shared.iter().any(SharedHold::asked) {
            // Every shared bucket admitted from this proxy's lease: no call.
            let first = admission.chain.first().copied();
            let mut shown = shown;
            for hold in &admission.shared {
                if let (Leasing::Taken { seen }, true) =
                    (&hold.leasing, shows(&hold.targets, first))
                {
                    for (c, used) in hold.counters.iter().zip(seen) {
                        shown.push((Rc::clone(&hold.rule), standing_of(c, *used)));
                    }
                }
            }
            host.count(metrics::QUOTA_LEASE_ADMISSIONS_TOTAL, 1);
            admission.headers = answer_headers(ask.caller_schema, &shown, alert_percents, now);
            return Ok(Admitted {
                chain,
                over_quota,
                admission: Some(admission),
            });
        }
        let (command, leasing) = store_command(&admission.shared, false);
        match host.call_out(&store::callout(store, &command)) {
            Ok(call) => {
                admission.waiting = Some(Waiting {
                    call,
                    whole_script: false,
                    leasing,
                    schema: ask.caller_schema,
                    local_shown: shown,
                    reserved_at_ms: now,
                });
            }
            Err(e) => {
                let why = format!("could not call the store: {e}");
                let kind = if store_command(&admission.shared, false).1 {
                    "lease"
                } else {
                    "reserve"
                };
                store_unavailable(host, who, &mut admission, (kind, &why), now)?;
                admission.headers = answer_headers(ask.caller_schema, &shown, alert_percents, now);
            }
        }
    } else {
        admission.headers = answer_headers(ask.caller_schema, &shown, alert_percents, now);
    }
    Ok(Admitted {
        chain,
        over_quota,
        admission: Some(admission),
    })
}

/// Whether a hold bound to `targets` shows in the answer's headers when
/// `first` serves.
fn shows(targets: &Option<Vec<usize>>, first: Option<usize>) -> bool {
    match (targets, first) {
        (None, _) => true,
        (Some(t), Some(first)) => t.contains(&first),
        (Some(_), None) => false,
    }
}

/// A shared counter standing at `used` (as the store last said).
fn standing_of(c: &Counter, used: u64) -> Standing {
    Standing {
        limit: c.limit,
        used,
        resets_at_ms: c.resets_at_ms,
    }
}

/// Reserves the holds of leased rules from this proxy's leases; a worker
/// elected to refill a lease it took from asks for the next one, detached.
fn take_leases(
    host: &mut dyn Host,
    store_config: &store::StoreConfig,
    shared: &mut [SharedHold],
    now: u64,
) -> Option<(usize, Standing)> {
    let stale_ms = store_config
        .timeout_ms
        .saturating_add(lease::STALE_MARGIN_MS);
    for (at, hold) in shared.iter_mut().enumerate() {
        let Some(policy) = hold.rule.lease.as_ref() else {
            continue;
        };
        match lease::take(host, &hold.key, policy, &hold.counters, now, stale_ms) {
            Take::Taken { refill, seen } => {
                lease::remember(host, &hold.key);
                if let Some(wanted) = refill {
                    let counters = &hold.counters;
                    lease::refill(
                        host,
                        store_config,
                        &hold.key,
                        policy,
                        counters,
                        &wanted,
                        false,
                    );
                }
                hold.leasing = Leasing::Taken { seen };
            }
            Take::Short { refill } => hold.leasing = Leasing::Asking { wanted: refill },
            Take::Full { index, seen } => {
                let c = hold.counters.get(index)?;
                return Some((at, standing_of(c, seen)));
            }
        }
    }
    None
}

/// The request's store call over the holds it asks: `reserve` in exact
/// mode, `lease` when a hold leases (exact holds then ask no extra).
fn store_command(shared: &[SharedHold], whole_script: bool) -> (String, bool) {
    let asked: Vec<&SharedHold> = shared.iter().filter(|h| h.asked()).collect();
    let all: Vec<Counter> = asked.iter().flat_map(|h| h.counters.clone()).collect();
    let leasing = asked
        .iter()
        .any(|h| matches!(h.leasing, Leasing::Asking { .. }));
    if !leasing {
        return (store::reserve_command(&all, whole_script), false);
    }
    let leases: Vec<(u64, u64)> = asked
        .iter()
        .flat_map(|&h| {
            let divisor = h.rule.lease.as_ref().map_or(1, |p| p.divisor());
            let wanted = match &h.leasing {
                Leasing::Asking { wanted: Some(w) } => w.as_slice(),
                _ => &[],
            };
            (0..h.counters.len()).map(move |i| (wanted.get(i).copied().unwrap_or(0), divisor))
        })
        .collect();
    (store::lease_command(&all, &leases, whole_script), true)
}

/// Rate-limit headers and the budget alert for the standings shown.
fn answer_headers(
    schema: Schema,
    shown: &[(Rc<LimitRule>, Standing)],
    alert_percents: &[u32],
    now: u64,
) -> Vec<(String, String)> {
    let mut headers = rate_limit_headers(schema, shown.iter().map(|(_, s)| *s), now);
    let refs: Vec<(&LimitRule, &Standing)> = shown.iter().map(|(r, s)| (&**r, s)).collect();
    if let Some(alert) = alert_header(&refs, alert_percents) {
        headers.push((BUDGET_HEADER.into(), alert));
    }
    headers
}

/// What a shared hold asked of each meter.
fn asked_of(counters: &[Counter]) -> Amounts {
    let mut asked = Amounts::default();
    for c in counters {
        match c.limit.meter {
            Meter::Requests => asked.requests = c.reserved,
            Meter::Tokens => asked.tokens = c.reserved,
            Meter::MicroUsd => asked.micro_usd = c.reserved,
        }
    }
    asked
}

/// Gives back every local reservation and what leases gave, ends this
/// worker's refill elections, and forgets the shared reservations (the
/// store did not add them).
fn release_all(host: &mut dyn Host, admission: &mut Admission, now: u64) {
    for hold in admission.held.drain(..) {
        buckets::settle(host, &hold.held, &Amounts::default(), now);
    }
    for hold in admission.shared.drain(..) {
        match hold.leasing {
            Leasing::Taken { .. } => lease::give_back(host, &hold.key, &hold.counters),
            Leasing::Asking { wanted: Some(_) } => lease::end_election(host, &hold.key),
            _ => {}
        }
    }
    admission.waiting = None;
}

/// The store could not answer: each shared rule's `on_store_failure`
/// decides. One closed rule refuses the request (503); when all are open it
/// goes on under its local limits only.
fn store_unavailable(
    host: &mut dyn Host,
    who: &Who,
    admission: &mut Admission,
    (kind, why): (&str, &str),
    now: u64,
) -> Result<(), Box<Rejection>> {
    let closed = admission
        .shared
        .iter()
        .find(|h| h.rule.shared == Some(FailureMode::Closed))
        .map(|h| h.rule.name.clone());
    if let Some(rule) = closed {
        store::count_call(host, kind, "fail_closed");
        log::warn!(
            "quota store: {why}; limit {rule:?} fails closed: caller {} refused",
            who.label()
        );
        release_all(host, admission, now);
        let error = ApiError::new(
            503,
            "server_error",
            Some("quota_store_unavailable"),
            format!(
                "The gateway cannot check the shared limit '{rule}' right now; please try again."
            ),
        );
        return Err(Box::new(Rejection {
            error,
            headers: vec![("retry-after".into(), store::UNAVAILABLE_RETRY_S.to_string())],
            rule,
            reason: "store_unavailable",
        }));
    }
    store::count_call(host, kind, "fail_open");
    log::warn!(
        "quota store: {why}; shared limits fail open: caller {} admitted on local limits",
        who.label()
    );
    // What leases gave stays reserved (settled locally); the rest is not.
    for hold in &admission.shared {
        if matches!(hold.leasing, Leasing::Asking { wanted: Some(_) }) {
            lease::end_election(host, &hold.key);
        }
    }
    admission
        .shared
        .retain(|h| matches!(h.leasing, Leasing::Taken { .. }));
    admission.waiting = None;
    Ok(())
}

/// The request ended before the store answered: gives back the local
/// reservations. The store's is left as it is (if it was made, it stays
/// counted until its window ends: an overcount, never an overshoot).
pub fn abandon(host: &mut dyn Host, mut admission: Admission) {
    let now = host.now_unix_millis();
    release_all(host, &mut admission, now);
}

impl Admission {
    /// The request waits for the shared store's answer (see
    /// [`on_store_answer`]).
    pub fn awaiting_store(&self) -> bool {
        self.waiting.is_some()
    }

    /// The store call whose answer the request waits for.
    pub fn awaited_call(&self) -> Option<CalloutId> {
        self.waiting.as_ref().map(|w| w.call)
    }
}

/// What a request waiting for the store does after an answer.
pub enum StoreStep {
    /// Still waiting (the script was sent again, whole).
    Waiting(Admission),
    /// Go on: admitted, with `headers` set for the answer.
    Go(Admission),
}

/// The store answered call `id` (or failed to): admits, refuses with the
/// caller's 429, or applies the rules' failure modes.
pub fn on_store_answer(
    config: &Config,
    host: &mut dyn Host,
    who: &Who,
    mut admission: Admission,
    id: CalloutId,
    answer: &CalloutAnswer,
) -> Result<StoreStep, Box<Rejection>> {
    let Some(mut waiting) = admission.waiting.take() else {
        return Ok(StoreStep::Go(admission));
    };
    if waiting.call != id {
        log::warn!(
            "quota store: an answer to call {id}, while call {} is awaited",
            waiting.call
        );
        admission.waiting = Some(waiting);
        return Ok(StoreStep::Waiting(admission));
    }
    let (_, alert_percents) = settings(config);
    let now = host.now_unix_millis();
    let schema = waiting.schema;
    let Some(store) = config.store() else {
        return Ok(StoreStep::Go(admission));
    };
    let kind = if waiting.leasing { "lease" } else { "reserve" };
    let n: usize = admission
        .shared
        .iter()
        .filter(|h| h.asked())
        .map(|h| h.counters.len())
        .sum();
    let numbers = if waiting.leasing { 2 * n } else { n };
    let why = match store::parse_reply(answer, numbers) {
        Reply::NoScript if !waiting.whole_script => {
            let (command, _) = store_command(&admission.shared, true);
            match host.call_out(&store::callout(store, &command)) {
                Ok(call) => {
                    waiting.call = call;
                    waiting.whole_script = true;
                    admission.waiting = Some(waiting);
                    return Ok(StoreStep::Waiting(admission));
                }
                Err(e) => format!("could not call the store: {e}"),
            }
        }
        Reply::NoScript => "Redis does not keep the script".to_string(),
        Reply::Failed(why) => why,
        Reply::Done {
            admitted: true,
            used,
        } => {
            store::count_call(host, kind, "ok");
            let mut shown = std::mem::take(&mut waiting.local_shown);
            let first = admission.chain.first().copied();
            let granted = used.get(n..).unwrap_or(&[]).to_vec();
            let mut used = used.into_iter().take(n);
            let mut granted = granted.into_iter();
            for hold in &mut admission.shared {
                if let Leasing::Taken { seen } = &hold.leasing {
                    if shows(&hold.targets, first) {
                        for (c, u) in hold.counters.iter().zip(seen) {
                            shown.push((Rc::clone(&hold.rule), standing_of(c, *u)));
                        }
                    }
                    continue;
                }
                let mut after_all = Vec::with_capacity(hold.counters.len());
                let mut extras = Vec::with_capacity(hold.counters.len());
                for (i, c) in hold.counters.iter().enumerate() {
                    let after = u64::try_from(used.next().unwrap_or(0)).unwrap_or(0);
                    let extra = u64::try_from(granted.next().unwrap_or(0)).unwrap_or(0);
                    after_all.push(after);
                    extras.push(extra);
                    let standing = standing_of(c, after);
                    let update = Update {
                        used_before: after.saturating_sub(c.reserved.saturating_add(extra)),
                        standing,
                    };
                    report(
                        host,
                        alert_percents,
                        &hold.rule,
                        &hold.key,
                        who,
                        (i, &update),
                    );
                    if shows(&hold.targets, first) {
                        shown.push((Rc::clone(&hold.rule), standing));
                    }
                }
                if let Leasing::Asking { wanted } = &hold.leasing {
                    let elected = wanted.is_some();
                    // The request's amount and the lease join this proxy's
                    // lease; the request settles there.
                    let reserved: Vec<u64> = hold.counters.iter().map(|c| c.reserved).collect();
                    let leased: Vec<u64> = reserved
                        .iter()
                        .zip(&extras)
                        .map(|(r, e)| r.saturating_add(*e))
                        .collect();
                    lease::apply_grant(
                        host,
                        &hold.key,
                        &hold.counters,
                        &leased,
                        &reserved,
                        &after_all,
                        elected,
                    );
                    for (c, e) in hold.counters.iter().zip(&extras) {
                        lease::count_units(host, store::meter_name(c.limit.meter), "granted", *e);
                    }
                    lease::remember(host, &hold.key);
                    hold.leasing = Leasing::Taken { seen: after_all };
                }
            }
            admission.headers = answer_headers(schema, &shown, alert_percents, now);
            return Ok(StoreStep::Go(admission));
        }
        Reply::Done {
            admitted: false,
            used,
        } => {
            // The refusal shown is the exceeded limit that resets last.
            let mut used = used.into_iter().take(n);
            let mut worst: Option<(&SharedHold, Standing)> = None;
            let mut leases_seen: Vec<(&SharedHold, Vec<u64>)> = Vec::new();
            for hold in admission.shared.iter().filter(|h| h.asked()) {
                let mut seen = Vec::with_capacity(hold.counters.len());
                for (i, c) in hold.counters.iter().enumerate() {
                    let now_used = u64::try_from(used.next().unwrap_or(0)).unwrap_or(0);
                    seen.push(now_used);
                    let standing = standing_of(c, now_used);
                    // The admin gauge follows refusals too (nothing crossed).
                    let update = Update {
                        used_before: now_used,
                        standing,
                    };
                    report(
                        host,
                        alert_percents,
                        &hold.rule,
                        &hold.key,
                        who,
                        (i, &update),
                    );
                    let exceeded =
                        c.reserved > 0 && now_used.saturating_add(c.reserved) > c.limit.max;
                    if exceeded && worst.is_none_or(|(_, w)| standing.resets_at_ms > w.resets_at_ms)
                    {
                        worst = Some((hold, standing));
                    }
                }
                if matches!(hold.leasing, Leasing::Asking { .. }) {
                    leases_seen.push((hold, seen));
                }
            }
            match worst {
                Some((hold, standing)) => {
                    store::count_call(host, kind, "refused");
                    let rejection = rejection(
                        schema,
                        &hold.rule.name,
                        &Refusal::Exceeded { standing },
                        &asked_of(&hold.counters),
                        now,
                    );
                    // Leases remember the store's counts, so requests that
                    // cannot fit are refused here for a moment.
                    for (hold, seen) in &leases_seen {
                        lease::note_refusal(host, &hold.key, &hold.counters, seen, now);
                    }
                    release_all(host, &mut admission, waiting.reserved_at_ms);
                    return Err(Box::new(rejection));
                }
                None => "the store refused without an exceeded limit".to_string(),
            }
        }
    };
    store_unavailable(
        host,
        who,
        &mut admission,
        (kind, &why),
        waiting.reserved_at_ms,
    )?;
    admission.headers = answer_headers(schema, &waiting.local_shown, alert_percents, now);
    Ok(StoreStep::Go(admission))
}

/// The buckets the request may draw from: every rule whose `match` fits
/// the caller, with the candidate targets it binds.
fn bindings<'a>(
    config: &'a Config,
    who: &Who,
    ask: &Ask,
    namespace_rules: &'a [Rc<LimitRule>],
    amounts: &dyn Fn(&mut dyn Iterator<Item = usize>) -> Amounts,
) -> Vec<Binding<'a>> {
    let mut out = Vec::new();
    for rule in rules(config, namespace_rules) {
        let mut bind = |model: &str, targets: Option<Vec<usize>>| {
            let facts = Facts {
                caller: who.caller.as_ref(),
                model,
                tags: &who.tags,
            };
            let Some(key) = rule.bucket(&facts) else {
                return;
            };
            // Request-wide buckets are priced once the chain is known.
            let amounts = match &targets {
                Some(t) => amounts(&mut t.iter().copied()),
                None => Amounts::default(),
            };
            out.push(Binding {
                rule,
                key,
                targets,
                amounts,
            });
        };
        let name = |m: usize| config.models.get(m).map_or("", |r| r.name.as_str());
        match rule.scope {
            ModelScope::Request => bind("", None),
            ModelScope::Model(m) => {
                if ask.chain.contains(&m) {
                    bind(name(m), Some(vec![m]));
                }
            }
            ModelScope::EachModel => {
                for &m in ask.chain {
                    bind(name(m), Some(vec![m]));
                }
            }
            ModelScope::Route(r) => {
                let Some(route) = config.routes.get(r).filter(|_| ask.routes.contains(&r)) else {
                    continue;
                };
                let targets: Vec<usize> = ask
                    .chain
                    .iter()
                    .copied()
                    .filter(|&m| route.targets.iter().any(|t| t.model == m))
                    .collect();
                if !targets.is_empty() {
                    bind(&route.name, Some(targets));
                }
            }
        }
    }
    out
}

/// Of the refusals met on a request's targets, the one to answer with: the
/// limit whose window ends first (retrying then may be served), else the
/// first met.
fn first_to_clear(refusals: &[(usize, Refusal)]) -> Option<(usize, Refusal)> {
    refusals
        .iter()
        .min_by_key(|(_, r)| match r {
            Refusal::Exceeded { standing } => (0, standing.resets_at_ms),
            Refusal::Busy => (1, 0),
            Refusal::TooLarge { .. } => (2, 0),
        })
        .cloned()
}

/// How a request ended, for settlement.
pub struct Outcome {
    /// Token counts the provider reported.
    pub usage: Option<Usage>,
    /// The target that answered, when one did.
    pub served: Option<usize>,
    /// How many targets of the admitted chain were tried, in order; None
    /// when not known (then every one of them may have been).
    pub attempts: Option<usize>,
    /// The status the caller got (0: none).
    pub status: u16,
    /// Answer bytes passed to the caller (charged when a stream was cut
    /// before the provider reported usage).
    pub response_bytes: u64,
}

/// What a request was finally charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Charge {
    pub usage: Usage,
    pub micro_usd: u64,
    /// The token counts are estimates (the provider reported none).
    pub estimated: bool,
}

/// The cost of a finished request, whether or not quotas apply.
pub fn charge(config: &Config, admission: Option<&Admission>, outcome: &Outcome) -> Charge {
    let prices = outcome.served.and_then(|m| prices_of(config, m));
    let (usage, estimated) = match outcome.usage {
        Some(u) => (u, false),
        // A provider that answered but reported nothing (or a stream the
        // caller abandoned): charge the prompt estimate and what was sent.
        None if (200..300).contains(&outcome.status) => {
            let Some(a) = admission else {
                return Charge::default();
            };
            let sent = outcome.response_bytes.div_ceil(a.bytes_per_token);
            (
                Usage {
                    input_tokens: a.prompt_estimate,
                    output_tokens: sent.min(a.output_estimate),
                    cached_input_tokens: 0,
                    reasoning_tokens: 0,
                },
                true,
            )
        }
        // Failed before any answer: providers do not bill errors.
        None => (Usage::default(), false),
    };
    Charge {
        usage,
        micro_usd: prices.map_or(0, |p| cost_micro_usd(&p, &usage)),
        estimated,
    }
}

/// Replaces the request's reservations with what it cost; logs and gauges
/// budget thresholds crossed on the way. Request-wide buckets get the
/// charge. A bucket bound to targets gets it when one of its targets
/// answered; when one was tried but another answered (or none did), one
/// request and nothing else, as any failed request; when none was tried,
/// nothing: its reservation is released.
pub fn settle(
    config: &Config,
    host: &mut dyn Host,
    who: &Who,
    admission: &Admission,
    charge: &Charge,
    outcome: &Outcome,
) {
    let (_, alert_percents) = settings(config);
    let now = host.now_unix_millis();
    let actual = Amounts {
        requests: 1,
        tokens: charge
            .usage
            .input_tokens
            .saturating_add(charge.usage.output_tokens),
        micro_usd: charge.micro_usd,
    };
    let tried_only = Amounts {
        requests: 1,
        ..Amounts::default()
    };
    let untried = Amounts::default();
    let tried = outcome.attempts.unwrap_or(usize::MAX);
    let reached = |m: usize| admission.chain.iter().take(tried).any(|&c| c == m);
    for hold in &admission.held {
        let amounts = match &hold.targets {
            None => &actual,
            Some(t) if outcome.served.is_some_and(|s| t.contains(&s)) => &actual,
            Some(t) if t.iter().any(|&m| reached(m)) => &tried_only,
            Some(_) => &untried,
        };
        for (i, u) in buckets::settle(host, &hold.held, amounts, now)
            .iter()
            .enumerate()
        {
            report(host, alert_percents, &hold.rule, &hold.key, who, (i, u));
        }
    }
    let Some(store_config) = config.store() else {
        return;
    };
    // Leased holds settle in this proxy's lease; usage past it is sent in
    // batches.
    for hold in admission
        .shared
        .iter()
        .filter(|h| matches!(h.leasing, Leasing::Taken { .. }))
    {
        let Some(policy) = hold.rule.lease.as_ref() else {
            continue;
        };
        let amounts = match &hold.targets {
            None => &actual,
            Some(t) if outcome.served.is_some_and(|s| t.contains(&s)) => &actual,
            Some(t) if t.iter().any(|&m| reached(m)) => &tried_only,
            Some(_) => &untried,
        };
        let deltas: Vec<i64> = hold
            .counters
            .iter()
            .map(|c| store::delta(c.reserved, amounts.of(c.limit.meter)))
            .collect();
        let owed = lease::settle(host, &hold.key, policy, &hold.counters, &deltas);
        if !owed.is_empty() {
            let owed: Vec<(&str, i64)> = owed.iter().map(|(k, d)| (k.as_str(), *d)).collect();
            store::settle(host, store_config, &owed, false, "settle");
        }
    }
    let deltas: Vec<(&str, i64)> = admission
        .shared
        .iter()
        .filter(|h| h.leasing == Leasing::No)
        .flat_map(|hold| {
            let amounts = match &hold.targets {
                None => &actual,
                Some(t) if outcome.served.is_some_and(|s| t.contains(&s)) => &actual,
                Some(t) if t.iter().any(|&m| reached(m)) => &tried_only,
                Some(_) => &untried,
            };
            hold.counters.iter().map(|c| {
                (
                    c.key.as_str(),
                    store::delta(c.reserved, amounts.of(c.limit.meter)),
                )
            })
        })
        .filter(|(_, d)| *d != 0)
        .collect();
    if !deltas.is_empty() {
        store::settle(host, store_config, &deltas, false, "settle");
    }
}

/// Logs a crossed alert threshold (once: only the write that crossed it
/// sees the crossing) and updates the usage gauge of the `index`th limit.
fn report(
    host: &mut dyn Host,
    alerts: &[u32],
    rule: &LimitRule,
    key: &str,
    who: &Who,
    (index, u): (usize, &Update),
) {
    let s = &u.standing;
    if let Some(pct) = u.crossed(alerts) {
        log::warn!(
            "budget alert: limit {:?} ({}) of bucket {key:?} passed {pct}% (used {} of {}), caller {}",
            rule.name,
            limit_field(&s.limit),
            shown(s.limit.meter, s.used),
            shown(s.limit.meter, s.limit.max),
            who.label(),
        );
    }
    let percent = u64::from(buckets::percent(s.used, s.limit.max));
    // A bucket without per-caller parts has its names ready.
    match rule.static_gauges.get(index).filter(|_| !key.contains('|')) {
        Some(name) => host.gauge(name, percent),
        None => host.gauge(&rule.gauge(key, &s.limit), percent),
    }
}

pub const BUDGET_HEADER: &str = "x-meshllm-budget";

/// `rule:limit=NN%` for every limit at or past the first alert threshold.
fn alert_header(all: &[(&LimitRule, &Standing)], alerts: &[u32]) -> Option<String> {
    let first = *alerts.first()?;
    let parts: Vec<String> = all
        .iter()
        .filter_map(|(rule, s)| {
            let pct = buckets::percent(s.used, s.limit.max);
            (pct >= first).then(|| format!("{}:{}={pct}%", rule.name, limit_field(&s.limit)))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn prices_of(config: &Config, model: usize) -> Option<Prices> {
    let a = &config.models.get(model)?.attributes;
    Some(Prices {
        input: a.input_price?,
        output: a.output_price?,
        cached_input: a.cached_input_price,
    })
}

/// An amount as people read it: dollars for money, a count otherwise.
fn shown(meter: Meter, n: u64) -> String {
    match meter {
        Meter::MicroUsd => format!("${}.{:06}", n / 1_000_000, n % 1_000_000),
        _ => n.to_string(),
    }
}

fn rejection(
    schema: Schema,
    rule: &str,
    refusal: &Refusal,
    asked: &Amounts,
    now: u64,
) -> Rejection {
    let mut headers: Vec<(String, String)> = Vec::new();
    let (error, reason) = match refusal {
        Refusal::Exceeded { standing } => {
            let l = standing.limit;
            let wait_ms = standing.resets_at_ms.saturating_sub(now);
            let wait = buckets::openai_duration(wait_ms);
            headers.push((
                "retry-after".into(),
                wait_ms.div_ceil(1000).max(1).to_string(),
            ));
            headers.extend(rate_limit_headers(schema, [*standing], now));
            let what = limit_field(&l);
            match l.meter {
                Meter::MicroUsd => {
                    // Waiting a few seconds will not help: say so to the SDKs.
                    headers.push(("x-should-retry".into(), "false".into()));
                    (
                        ApiError::new(
                            429,
                            "insufficient_quota",
                            Some("insufficient_quota"),
                            format!(
                                "You exceeded your budget: limit '{rule}' allows {} ({what}); {} is used and this request needs up to {}. The budget resets in {wait}.",
                                shown(l.meter, l.max),
                                shown(l.meter, standing.used),
                                shown(l.meter, asked.micro_usd),
                            ),
                        ),
                        "budget",
                    )
                }
                meter => {
                    let unit = if meter == Meter::Requests {
                        "requests"
                    } else {
                        "tokens"
                    };
                    (
                        ApiError::new(
                            429,
                            unit,
                            Some("rate_limit_exceeded"),
                            format!(
                                "Rate limit reached on {what} in limit '{rule}': Limit {}, Used {}, Requested {}. Please try again in {wait}.",
                                l.max,
                                standing.used,
                                asked.of(meter),
                            ),
                        ),
                        "rate",
                    )
                }
            }
        }
        Refusal::TooLarge { limit, requested } => {
            headers.push(("x-should-retry".into(), "false".into()));
            (
                ApiError::new(
                    429,
                    if limit.meter == Meter::MicroUsd { "insufficient_quota" } else { "tokens" },
                    Some(if limit.meter == Meter::MicroUsd { "insufficient_quota" } else { "rate_limit_exceeded" }),
                    format!(
                        "Request too large for limit '{rule}' ({}): Limit {}, Requested {}. Lower max_tokens or the prompt size.",
                        limit_field(limit),
                        shown(limit.meter, limit.max),
                        shown(limit.meter, *requested),
                    ),
                ),
                "too_large",
            )
        }
        Refusal::Busy => {
            headers.push(("retry-after".into(), "1".into()));
            (
                ApiError::new(
                    429,
                    "requests",
                    Some("rate_limit_exceeded"),
                    "The gateway could not update its quota counters in time; please try again."
                        .into(),
                ),
                "busy",
            )
        }
    };
    Rejection {
        error,
        headers,
        rule: rule.to_string(),
        reason,
    }
}

/// The caller's rate-limit headers, in its API's own spelling, from the
/// tightest request limit and the tightest token limit that apply.
pub fn rate_limit_headers(
    schema: Schema,
    standings: impl IntoIterator<Item = Standing>,
    now: u64,
) -> Vec<(String, String)> {
    let mut requests: Option<Standing> = None;
    let mut tokens: Option<Standing> = None;
    for s in standings {
        let slot = match s.limit.meter {
            Meter::Requests => &mut requests,
            Meter::Tokens => &mut tokens,
            Meter::MicroUsd => continue,
        };
        if slot.is_none_or(|t| s.remaining() < t.remaining()) {
            *slot = Some(s);
        }
    }
    // Header names spelled out (not formatted) per schema and meter.
    const OPENAI: [[&str; 3]; 2] = [
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    ];
    const ANTHROPIC: [[&str; 3]; 2] = [
        [
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        ],
        [
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-tokens-reset",
        ],
    ];
    let mut out = Vec::new();
    for (kind, s) in [requests, tokens].into_iter().enumerate() {
        let Some(s) = s else { continue };
        let wait = s.resets_at_ms.saturating_sub(now);
        let (names, reset) = match schema {
            Schema::OpenAi | Schema::Converse | Schema::Responses => {
                (&OPENAI, buckets::openai_duration(wait))
            }
            Schema::Anthropic => (&ANTHROPIC, rfc3339(s.resets_at_ms)),
            // Google's API sends no rate-limit headers; 429s carry retry-after.
            Schema::Gemini => continue,
        };
        let Some([limit, remaining, resets]) = names.get(kind) else {
            continue;
        };
        out.push((limit.to_string(), s.limit.max.to_string()));
        out.push((remaining.to_string(), s.remaining().to_string()));
        out.push((resets.to_string(), reset));
    }
    out
}

/// `2026-11-21T07:22:53Z` for a Unix time in milliseconds.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = buckets::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(meter: Meter, max: u64, used: u64, resets_at_ms: u64) -> Standing {
        Standing {
            limit: Limit {
                meter,
                window: buckets::Window::Minute,
                max,
            },
            used,
            resets_at_ms,
        }
    }

    #[test]
    fn rate_limit_headers_pick_the_tightest_limit() {
        let now = 1_000_000;
        let all = [
            standing(Meter::Requests, 100, 10, now + 30_000),
            standing(Meter::Requests, 20, 15, now + 6_000),
            standing(Meter::Tokens, 1000, 10, now + 500),
            standing(Meter::MicroUsd, 1, 1, now),
        ];
        let h = rate_limit_headers(Schema::OpenAi, all, now);
        let want: Vec<(String, String)> = [
            ("x-ratelimit-limit-requests", "20"),
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "6s"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "990"),
            ("x-ratelimit-reset-tokens", "500ms"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(h, want);
        let a = rate_limit_headers(Schema::Anthropic, all, now);
        assert_eq!(
            a[0],
            ("anthropic-ratelimit-requests-limit".into(), "20".into())
        );
        assert_eq!(a[2].0, "anthropic-ratelimit-requests-reset");
        assert!(rate_limit_headers(Schema::Gemini, all, now).is_empty());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_245_773_123), "2026-11-21T07:22:53Z");
    }

    #[test]
    fn money_is_shown_in_dollars() {
        assert_eq!(shown(Meter::MicroUsd, 12_500_000), "$12.500000");
        assert_eq!(shown(Meter::MicroUsd, 7), "$0.000007");
        assert_eq!(shown(Meter::Tokens, 7), "7");
    }
}
