//! Routing policy: for one request to a routing alias, which targets
//! (provider + model pairs) are tried, in which order, and why.
//!
//! Pure logic. The caller fills [`Candidate`]s from the configuration and the
//! proxy-wide health/latency data, [`Needs`] from the request
//! ([`needs_from`]), and turns the returned [`Decision`] into attempts.
//!
//! # Steps of [`decide`]
//!
//! 1. **Capabilities.** Candidates that cannot serve the request are dropped:
//!    tools, images or JSON mode asked for but not supported; a context
//!    window smaller than `prompt_tokens + max_output_tokens` (an unknown
//!    window is not filtered); a region outside `needs.regions` (a candidate
//!    without a region fails any region requirement); zero data retention
//!    asked for but not offered. If none remain the answer is
//!    [`NoTarget::Unsupported`], naming the unmet needs of every candidate.
//! 2. **Health.** Candidates with `available == false` (cooling down after
//!    failures) are dropped, unless that would leave none: then all of them
//!    stay, so live traffic probes whether they recovered.
//! 3. **Order** by the [`Strategy`]; every sort is stable, so ties keep the
//!    configured order.
//!
//! # Reason grammar
//!
//! [`Decision::reason`] is one short token list, safe for an HTTP header or
//! an access log:
//!
//! ```text
//! reason   = strategy [";filtered=" names] [";skipped=" names | ";all_unavailable"]
//! strategy = "ordered" | "weighted:" name | "lowest_cost" | "lowest_latency"
//!          | "scored" | "auto" | "auto:" ("hard" | "simple") ["(" features ")"]
//! names    = name *("," name)      ; candidates in configured order
//! features = feature *("," feature) ; the `why` of the auto verdict
//! ```
//!
//! `filtered` lists candidates dropped for capabilities, `skipped` those
//! dropped for health, `all_unavailable` says every capable candidate was
//! cooling down and they are tried anyway. Names are sanitised: characters
//! other than ASCII letters, digits and `.-_:/` become `_`.
//!
//! # Auto router
//!
//! [`classify`] scores a prompt's [`PromptFeatures`]; at [`HARD_POINTS`]
//! points or more the prompt is hard. The table is deliberately small so an
//! operator can predict where a prompt goes:
//!
//! | why         | triggered when                                                  | points |
//! |-------------|-----------------------------------------------------------------|--------|
//! | `long`      | last user message > 2000 chars, or whole prompt > 12000 chars   | 2      |
//! | `turns`     | more than 10 messages besides the system prompt                 | 1      |
//! | `code`      | a ``` fence, 3+ distinct code tokens, or dense `{};`            | 2      |
//! | `reasoning` | reasoning terms in the last user message (weighted, see below)  | 1 each, max 2 |
//! | `tools`     | tools offered                                                   | 2      |
//! | `images`    | image or file input                                             | 2      |
//! | `json`      | JSON mode or a JSON schema asked for                            | 2      |
//! | `effort`    | `reasoning_effort: high`, Anthropic `thinking`, Gemini thinking budget/level high | 2 |
//!
//! Reasoning terms are whole words, case-insensitive, each group counted
//! once: proof/prove, derive/derivation, theorem/lemma and "step by step"
//! weigh 2; why, analyze/analysis, debug, optimize, refactor, architecture,
//! trade-off, compare/comparison, algorithm, complexity and calculate weigh 1.
//! So one "why" alone stays simple, "prove ..." or "why ... compare" is hard.
//! Reasoning terms are read from the last user message only, and code from
//! the messages only: a system prompt is the same on every request of an
//! application and would push all its traffic one way.
//!
//! For [`Strategy::Auto`] the caller puts the verdict in
//! [`Needs::auto_hard`] and marks targets with a [`Tier`]: targets of the
//! chosen tier (and [`Tier::Any`]) come first in configured order, the other
//! tier follows as fallback. Without a verdict the configured order is kept
//! and the reason is plain `auto`.

use std::fmt;

use serde_json::Value;

use crate::core::schema::Schema;

/// Below this many latency samples a target is explored before the measured
/// ones, so new or rarely used targets get measured at all.
pub const MIN_LATENCY_SAMPLES: u32 = 3;

/// Output tokens assumed for cost estimates when the request sets no limit.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 512;

/// A prompt with at least this many points is hard.
pub const HARD_POINTS: u32 = 2;

const LONG_LAST_USER_CHARS: usize = 2000;
const LONG_TOTAL_CHARS: usize = 12_000;
const LONG_POINTS: u32 = 2;
const MANY_TURNS: usize = 10;
const TURNS_POINTS: u32 = 1;
const CODE_POINTS: u32 = 2;
const REASONING_MAX_POINTS: u32 = 2;
const TOOLS_POINTS: u32 = 2;
const IMAGES_POINTS: u32 = 2;
const JSON_POINTS: u32 = 2;
const EFFORT_POINTS: u32 = 2;

/// Substrings typical of source code; prose rarely holds three of them.
const CODE_TOKENS: &[&str] = &[
    "fn ",
    "def ",
    "class ",
    "#include",
    "SELECT ",
    "=>",
    "function(",
    "import ",
    "return ",
    "const ",
    "let ",
    "};",
    "){",
    ") {",
    "!=",
    "==",
    "&&",
    "::",
    "</",
    "print(",
];
const CODE_TOKENS_MIN: usize = 3;
/// `{`, `}` and `;` this often (per mille of bytes, and at least
/// `CODE_PUNCT_MIN` of them) mean code or structured data.
const CODE_PUNCT_MIN: usize = 8;
const CODE_PUNCT_PER_MILLE: usize = 20;

/// Groups of whole words (lower case) and the weight a group adds once.
const REASONING_TERMS: &[(&[&str], usize)] = &[
    (&["prove", "proves", "proving", "proof", "proofs"], 2),
    (&["derive", "deriving", "derivation"], 2),
    (&["theorem", "theorems", "lemma"], 2),
    (&["step by step", "step-by-step"], 2),
    (&["why"], 1),
    (
        &["analyze", "analyse", "analyzing", "analysing", "analysis"],
        1,
    ),
    (&["debug", "debugging"], 1),
    (
        &[
            "optimize",
            "optimise",
            "optimizing",
            "optimising",
            "optimization",
            "optimisation",
        ],
        1,
    ),
    (&["refactor", "refactoring"], 1),
    (&["architecture"], 1),
    (&["trade-off", "trade-offs", "tradeoff", "tradeoffs"], 1),
    (&["compare", "comparing", "comparison"], 1),
    (&["algorithm", "algorithms"], 1),
    (&["complexity"], 1),
    (&["calculate", "calculating", "calculation"], 1),
];

/// What a target can do, from the configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Capabilities {
    pub tools: bool,
    pub vision: bool,
    pub json_mode: bool,
    /// Tokens in + out; `None` = unknown, never filtered on.
    pub context_window: Option<u64>,
    pub region: Option<String>,
    pub zero_retention: bool,
}

/// Measured latency of a target (e.g. a moving average kept in shared data).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyStats {
    /// Whole request.
    pub latency_ms: f64,
    /// Time to first token, measured on streams.
    pub ttft_ms: Option<f64>,
    pub samples: u32,
}

/// Which kind of prompt a target is meant for under [`Strategy::Auto`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tier {
    /// Serves both kinds in the first group.
    #[default]
    Any,
    /// Cheap model for simple prompts.
    Simple,
    /// Strong model for hard prompts.
    Hard,
}

/// One target of the route, in configured order.
#[derive(Debug, Clone, Default)]
pub struct Candidate<'a> {
    /// The caller's index for the target; returned in [`Decision::order`].
    pub id: usize,
    /// Used in reasons and messages.
    pub name: &'a str,
    pub weight: u32,
    /// Micro-dollars per million input tokens.
    pub input_price: Option<u64>,
    /// Micro-dollars per million output tokens.
    pub output_price: Option<u64>,
    /// User-supplied score in 0..=1.
    pub quality: Option<f64>,
    pub caps: Capabilities,
    pub latency: Option<LatencyStats>,
    /// False while the target cools down after failures.
    pub available: bool,
    pub tier: Tier,
}

/// What the request requires of a target.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Needs {
    pub tools: bool,
    pub vision: bool,
    pub json_mode: bool,
    pub prompt_tokens: u64,
    pub max_output_tokens: Option<u64>,
    /// Allowed regions (data policy); `None` = any.
    pub regions: Option<Vec<String>>,
    pub zero_retention: bool,
    pub stream: bool,
    /// The [`classify`] verdict, read by [`Strategy::Auto`] only.
    pub auto_hard: Option<AutoVerdict>,
}

/// Weights of the normalised attributes for [`Strategy::Scored`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreWeights {
    pub price: f64,
    pub latency: f64,
    pub quality: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// As configured.
    Ordered,
    /// First target drawn by weight, the rest as configured.
    Weighted,
    /// Cheapest estimated cost first; unknown prices last.
    LowestCost,
    /// Unmeasured targets first (exploration), then fastest first.
    LowestLatency,
    /// Highest weighted sum of min-max normalised price, latency, quality.
    Scored(ScoreWeights),
    /// Targets of the tier [`classify`] chose first.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Candidate ids, to try in this order.
    pub order: Vec<usize>,
    /// See the module doc for the grammar.
    pub reason: String,
}

/// A need a candidate does not meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmet {
    Tools,
    Vision,
    JsonMode,
    Context {
        window: u64,
        required: u64,
    },
    /// The candidate's region, outside the allowed ones.
    Region(Option<String>),
    ZeroRetention,
}

impl Unmet {
    /// Position in the fixed order needs are listed in.
    fn rank(&self) -> u8 {
        match self {
            Unmet::Tools => 0,
            Unmet::Vision => 1,
            Unmet::JsonMode => 2,
            Unmet::Context { .. } => 3,
            Unmet::Region(_) => 4,
            Unmet::ZeroRetention => 5,
        }
    }

    /// The need, as in "no target of this route supports ...".
    fn need(&self) -> String {
        match self {
            Unmet::Tools => "tools".into(),
            Unmet::Vision => "images".into(),
            Unmet::JsonMode => "JSON mode".into(),
            Unmet::Context { required, .. } => format!("a {required}-token context"),
            Unmet::Region(_) => "data residency in the allowed regions".into(),
            Unmet::ZeroRetention => "zero data retention".into(),
        }
    }
}

impl fmt::Display for Unmet {
    /// What one candidate lacks.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmet::Tools => f.write_str("no tools"),
            Unmet::Vision => f.write_str("no vision"),
            Unmet::JsonMode => f.write_str("no JSON mode"),
            Unmet::Context { window, required } => {
                write!(f, "context window {window} < {required} tokens")
            }
            Unmet::Region(Some(region)) => write!(f, "region {region}"),
            Unmet::Region(None) => f.write_str("no region"),
            Unmet::ZeroRetention => f.write_str("retains data"),
        }
    }
}

/// A candidate dropped by the capability filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub unmet: Vec<Unmet>,
}

/// Why no target can serve the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoTarget {
    /// The route lists no targets (a configuration problem).
    NoTargets,
    /// Every target lacks something the request needs (a request problem).
    Unsupported(Vec<Rejected>),
}

impl fmt::Display for NoTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rejected = match self {
            NoTarget::NoTargets => return f.write_str("this route has no targets"),
            NoTarget::Unsupported(rejected) => rejected,
        };
        let mut unmet: Vec<&Unmet> = rejected.iter().flat_map(|r| &r.unmet).collect();
        unmet.sort_by_key(|u| u.rank());
        unmet.dedup_by_key(|u| u.rank());
        let needs: Vec<String> = unmet.iter().map(|u| u.need()).collect();
        write!(f, "no target of this route supports {}", join_and(&needs))?;
        for (i, r) in rejected.iter().enumerate() {
            f.write_str(if i == 0 { " (" } else { "; " })?;
            write!(f, "{}: ", r.name)?;
            for (j, u) in r.unmet.iter().enumerate() {
                if j > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{u}")?;
            }
        }
        if !rejected.is_empty() {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// "a", "a and b", "a, b and c".
fn join_and(items: &[String]) -> String {
    match items.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// The order in which to try `candidates` (in configured order) for a request
/// with `needs`. `roll` is any uniformly distributed number; only
/// [`Strategy::Weighted`] uses it, so the caller controls randomness and
/// tests are deterministic.
pub fn decide(
    strategy: &Strategy,
    candidates: &[Candidate],
    needs: &Needs,
    roll: u64,
) -> Result<Decision, NoTarget> {
    if candidates.is_empty() {
        return Err(NoTarget::NoTargets);
    }
    let mut capable = Vec::with_capacity(candidates.len());
    let mut rejected = Vec::new();
    for c in candidates {
        let unmet = unmet_needs(c, needs);
        if unmet.is_empty() {
            capable.push(c);
        } else {
            rejected.push(Rejected {
                name: c.name.to_string(),
                unmet,
            });
        }
    }
    if capable.is_empty() {
        return Err(NoTarget::Unsupported(rejected));
    }

    let (live, cooling): (Vec<&Candidate>, Vec<&Candidate>) =
        capable.iter().partition(|c| c.available);
    let all_unavailable = live.is_empty();
    let pool = if all_unavailable { &cooling } else { &live };

    let (order, mut reason) = order_by(strategy, pool, needs, roll);
    if !rejected.is_empty() {
        reason.push_str(";filtered=");
        push_names(&mut reason, rejected.iter().map(|r| r.name.as_str()));
    }
    if all_unavailable {
        reason.push_str(";all_unavailable");
    } else if !cooling.is_empty() {
        reason.push_str(";skipped=");
        push_names(&mut reason, cooling.iter().map(|c| c.name));
    }
    Ok(Decision {
        order: order.iter().map(|c| c.id).collect(),
        reason,
    })
}

fn unmet_needs(c: &Candidate, needs: &Needs) -> Vec<Unmet> {
    let caps = &c.caps;
    let mut unmet = Vec::new();
    if needs.tools && !caps.tools {
        unmet.push(Unmet::Tools);
    }
    if needs.vision && !caps.vision {
        unmet.push(Unmet::Vision);
    }
    if needs.json_mode && !caps.json_mode {
        unmet.push(Unmet::JsonMode);
    }
    let required = needs
        .prompt_tokens
        .saturating_add(needs.max_output_tokens.unwrap_or(0));
    if let Some(window) = caps.context_window.filter(|&w| w < required) {
        unmet.push(Unmet::Context { window, required });
    }
    if let Some(allowed) = &needs.regions {
        let inside = caps
            .region
            .as_ref()
            .is_some_and(|r| allowed.iter().any(|a| a == r));
        if !inside {
            unmet.push(Unmet::Region(caps.region.clone()));
        }
    }
    if needs.zero_retention && !caps.zero_retention {
        unmet.push(Unmet::ZeroRetention);
    }
    unmet
}

/// `pool` ordered by `strategy`, and the strategy part of the reason.
fn order_by<'c, 'a>(
    strategy: &Strategy,
    pool: &[&'c Candidate<'a>],
    needs: &Needs,
    roll: u64,
) -> (Vec<&'c Candidate<'a>>, String) {
    let mut order = pool.to_vec();
    let reason = match strategy {
        Strategy::Ordered => "ordered".to_string(),
        Strategy::Weighted => {
            // Move the drawn target to the front; the rest keep their order.
            if let Some(head) = order.get_mut(..=weighted_pick(pool, roll)) {
                head.rotate_right(1);
            }
            let mut reason = "weighted:".to_string();
            push_names(&mut reason, order.first().map(|c| c.name).into_iter());
            reason
        }
        Strategy::LowestCost => {
            // `None` sorts before `Some`, so unknown costs are keyed as MAX.
            order.sort_by_key(|c| estimated_cost(c, needs).unwrap_or(u128::MAX));
            "lowest_cost".to_string()
        }
        Strategy::LowestLatency => {
            order.sort_by(
                |a, b| match (measured_latency(a, needs), measured_latency(b, needs)) {
                    (Some(a), Some(b)) => a.total_cmp(&b),
                    // Unmeasured first, in configured order.
                    (a, b) => a.is_some().cmp(&b.is_some()),
                },
            );
            "lowest_latency".to_string()
        }
        Strategy::Scored(weights) => {
            let scores = scores(pool, needs, weights);
            let mut ranked: Vec<(f64, &Candidate)> = scores.into_iter().zip(order).collect();
            ranked.sort_by(|(a, _), (b, _)| b.total_cmp(a));
            order = ranked.into_iter().map(|(_, c)| c).collect();
            "scored".to_string()
        }
        Strategy::Auto => match &needs.auto_hard {
            None => "auto".to_string(),
            Some(verdict) => {
                let chosen = if verdict.hard {
                    Tier::Hard
                } else {
                    Tier::Simple
                };
                order.sort_by_key(|c| c.tier != chosen && c.tier != Tier::Any);
                let mut reason = format!("auto:{}", if verdict.hard { "hard" } else { "simple" });
                if !verdict.why.is_empty() {
                    reason.push('(');
                    reason.push_str(&verdict.why.join(","));
                    reason.push(')');
                }
                reason
            }
        },
    };
    (order, reason)
}

/// Index in `pool` of the target drawn by weight: `roll % total` falls in
/// one target's share of the cumulative weights. All weights zero: the first.
fn weighted_pick(pool: &[&Candidate], roll: u64) -> usize {
    let total: u64 = pool.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return 0;
    }
    let mut point = roll % total;
    pool.iter()
        .position(|c| {
            let weight = u64::from(c.weight);
            if point < weight {
                true
            } else {
                point -= weight;
                false
            }
        })
        .unwrap_or(0)
}

/// Estimated price of the request in micro-dollars per million (only
/// compared, never shown); `None` when a price is unknown.
fn estimated_cost(c: &Candidate, needs: &Needs) -> Option<u128> {
    let output_tokens = needs.max_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS);
    let input = u128::from(c.input_price?) * u128::from(needs.prompt_tokens);
    let output = u128::from(c.output_price?) * u128::from(output_tokens);
    Some(input + output)
}

/// The latency that matters for this request: time to first token on
/// streams when measured, else the whole request. `None` when unmeasured.
fn observed_latency(c: &Candidate, needs: &Needs) -> Option<f64> {
    let stats = c.latency.filter(|s| s.samples > 0)?;
    let ms = match stats.ttft_ms {
        Some(ttft) if needs.stream => ttft,
        _ => stats.latency_ms,
    };
    ms.is_finite().then_some(ms)
}

/// The latency [`Strategy::LowestLatency`] sorts by; `None` while the target
/// has too few samples and is still to be explored.
fn measured_latency(c: &Candidate, needs: &Needs) -> Option<f64> {
    let samples = c.latency.map_or(0, |s| s.samples);
    observed_latency(c, needs).filter(|_| samples >= MIN_LATENCY_SAMPLES)
}

/// Score of each candidate of `pool`, in the same order.
fn scores(pool: &[&Candidate], needs: &Needs, weights: &ScoreWeights) -> Vec<f64> {
    // Costs fit f64 comfortably for comparison; precision loss is irrelevant.
    let costs: Vec<Option<f64>> = pool
        .iter()
        .map(|c| estimated_cost(c, needs).map(|v| v as f64))
        .collect();
    let latencies: Vec<Option<f64>> = pool.iter().map(|c| observed_latency(c, needs)).collect();
    let qualities: Vec<Option<f64>> = pool.iter().map(|c| c.quality).collect();
    let price = normalise(&costs, false);
    let latency = normalise(&latencies, false);
    let quality = normalise(&qualities, true);
    price
        .iter()
        .zip(&latency)
        .zip(&quality)
        .map(|((p, l), q)| weights.price * p + weights.latency * l + weights.quality * q)
        .collect()
}

/// Min-max normalisation to 0..=1 with 1 the best; a missing (or non-finite)
/// value scores 0, and when all known values are equal each scores 1.
fn normalise(values: &[Option<f64>], higher_is_better: bool) -> Vec<f64> {
    let known = || values.iter().flatten().copied().filter(|v| v.is_finite());
    let min = known().fold(f64::INFINITY, f64::min);
    let max = known().fold(f64::NEG_INFINITY, f64::max);
    values
        .iter()
        .map(|v| match v {
            Some(v) if v.is_finite() => {
                if max > min {
                    if higher_is_better {
                        (v - min) / (max - min)
                    } else {
                        (max - v) / (max - min)
                    }
                } else {
                    1.0
                }
            }
            _ => 0.0,
        })
        .collect()
}

/// Appends `names` comma-separated, sanitised so they cannot break the
/// reason grammar or a header.
fn push_names<'n>(out: &mut String, names: impl Iterator<Item = &'n str>) {
    for (i, name) in names.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.extend(name.chars().map(|ch| {
            if ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_' | ':' | '/') {
                ch
            } else {
                '_'
            }
        }));
    }
}

/// What [`classify`] looks at, read from a request by [`prompt_features`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptFeatures {
    /// Text of the last user message.
    pub last_user_chars: usize,
    /// Text of the whole prompt, system prompt included.
    pub total_chars: usize,
    /// Messages besides the system prompt.
    pub turns: usize,
    pub has_code: bool,
    /// Weighted count of reasoning-term groups in the last user message.
    pub reasoning_terms: usize,
    pub tools: bool,
    pub images: bool,
    pub json_mode: bool,
    pub reasoning_effort_high: bool,
}

/// Simple or hard, and the features that counted (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoVerdict {
    pub hard: bool,
    pub why: Vec<&'static str>,
}

pub fn classify(f: &PromptFeatures) -> AutoVerdict {
    let reasoning_points = u32::try_from(f.reasoning_terms)
        .unwrap_or(u32::MAX)
        .min(REASONING_MAX_POINTS);
    let table = [
        (
            "long",
            f.last_user_chars > LONG_LAST_USER_CHARS || f.total_chars > LONG_TOTAL_CHARS,
            LONG_POINTS,
        ),
        ("turns", f.turns > MANY_TURNS, TURNS_POINTS),
        ("code", f.has_code, CODE_POINTS),
        ("reasoning", reasoning_points > 0, reasoning_points),
        ("tools", f.tools, TOOLS_POINTS),
        ("images", f.images, IMAGES_POINTS),
        ("json", f.json_mode, JSON_POINTS),
        ("effort", f.reasoning_effort_high, EFFORT_POINTS),
    ];
    let mut points = 0;
    let mut why = Vec::new();
    for (name, triggered, worth) in table {
        if triggered {
            points += worth;
            why.push(name);
        }
    }
    AutoVerdict {
        hard: points >= HARD_POINTS,
        why,
    }
}

pub fn prompt_features(caller: Schema, body: &Value) -> PromptFeatures {
    let prompt = read_prompt(caller, body);
    let last_user = prompt.turns.iter().rev().find(|t| t.from_user);
    PromptFeatures {
        last_user_chars: last_user.map_or(0, |t| char_count(&t.texts)),
        total_chars: prompt.total_chars(),
        turns: prompt.turns.len(),
        has_code: looks_like_code(prompt.turns.iter().flat_map(|t| t.texts.iter().copied())),
        reasoning_terms: last_user.map_or(0, |t| reasoning_terms(&t.texts)),
        tools: prompt.tools,
        images: prompt.images,
        json_mode: prompt.json_mode,
        reasoning_effort_high: prompt.effort_high,
    }
}

/// The request's needs. `prompt_tokens` is estimated from the prompt text
/// (system, messages, tool results) at 4 chars a token, rounded up; tool
/// definitions and tool-call arguments are not counted, so the estimate errs
/// low and the context filter never rejects a request that would fit.
/// `regions`, `zero_retention` and `auto_hard` are left for the caller
/// (they come from policy and [`classify`], not from the body).
pub fn needs_from(caller: Schema, body: &Value, stream: bool) -> Needs {
    let prompt = read_prompt(caller, body);
    Needs {
        tools: prompt.tools,
        vision: prompt.images,
        json_mode: prompt.json_mode,
        prompt_tokens: u64::try_from(prompt.total_chars().div_ceil(4)).unwrap_or(u64::MAX),
        max_output_tokens: prompt.max_output_tokens,
        regions: None,
        zero_retention: false,
        stream,
        auto_hard: None,
    }
}

/// A request reduced to what routing reads, whatever its schema.
#[derive(Default)]
struct Prompt<'v> {
    system: Vec<&'v str>,
    /// Messages besides the system prompt, in order.
    turns: Vec<Turn<'v>>,
    images: bool,
    tools: bool,
    json_mode: bool,
    effort_high: bool,
    max_output_tokens: Option<u64>,
}

struct Turn<'v> {
    from_user: bool,
    texts: Vec<&'v str>,
}

impl Prompt<'_> {
    fn total_chars(&self) -> usize {
        char_count(&self.system)
            + self
                .turns
                .iter()
                .map(|t| char_count(&t.texts))
                .sum::<usize>()
    }
}

fn char_count(texts: &[&str]) -> usize {
    texts.iter().map(|t| t.chars().count()).sum()
}

fn read_prompt(caller: Schema, body: &Value) -> Prompt<'_> {
    match caller {
        Schema::OpenAi => read_openai(body),
        Schema::Anthropic => read_anthropic(body),
        Schema::Gemini => read_gemini(body),
        Schema::Converse => read_converse(body),
        Schema::Responses => read_responses(body),
    }
}

fn array(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn str_at<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

fn non_empty_array(v: Option<&Value>) -> bool {
    !array(v).is_empty()
}

fn read_openai(body: &Value) -> Prompt<'_> {
    let mut p = Prompt::default();
    for message in array(body.get("messages")) {
        let mut texts = Vec::new();
        match message.get("content") {
            Some(Value::String(s)) => texts.push(s.as_str()),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match str_at(part, "type") {
                        Some("text") => texts.extend(str_at(part, "text")),
                        Some("image_url") => p.images = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        match str_at(message, "role") {
            Some("system" | "developer") => p.system.extend(texts),
            role => p.turns.push(Turn {
                from_user: role == Some("user"),
                texts,
            }),
        }
    }
    p.tools = non_empty_array(body.get("tools")) || non_empty_array(body.get("functions"));
    p.json_mode = body
        .get("response_format")
        .and_then(|f| str_at(f, "type"))
        .is_some_and(|t| matches!(t, "json_object" | "json_schema"));
    p.effort_high = str_at(body, "reasoning_effort") == Some("high");
    p.max_output_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64);
    p
}

/// A Responses request: `instructions`, then `input` as a string or items.
fn read_responses(body: &Value) -> Prompt<'_> {
    let mut p = Prompt::default();
    p.system.extend(str_at(body, "instructions"));
    match body.get("input") {
        Some(Value::String(s)) => p.turns.push(Turn {
            from_user: true,
            texts: vec![s.as_str()],
        }),
        Some(Value::Array(items)) => {
            for item in items {
                let mut texts = Vec::new();
                match item.get("content") {
                    Some(Value::String(s)) => texts.push(s.as_str()),
                    Some(Value::Array(parts)) => {
                        for part in parts {
                            match str_at(part, "type") {
                                Some("input_image") => p.images = true,
                                _ => texts.extend(str_at(part, "text")),
                            }
                        }
                    }
                    _ => texts.extend(str_at(item, "output").or_else(|| str_at(item, "arguments"))),
                }
                match str_at(item, "role") {
                    Some("system" | "developer") => p.system.extend(texts),
                    role => p.turns.push(Turn {
                        from_user: role == Some("user"),
                        texts,
                    }),
                }
            }
        }
        _ => {}
    }
    p.tools = non_empty_array(body.get("tools"));
    p.json_mode = body
        .pointer("/text/format/type")
        .and_then(Value::as_str)
        .is_some_and(|t| matches!(t, "json_object" | "json_schema"));
    p.effort_high = body.pointer("/reasoning/effort").and_then(Value::as_str) == Some("high");
    p.max_output_tokens = body.get("max_output_tokens").and_then(Value::as_u64);
    p
}

/// Anthropic content: a string or blocks; tool results nest blocks once.
fn read_anthropic_content<'v>(content: &'v Value, texts: &mut Vec<&'v str>, images: &mut bool) {
    match content {
        Value::String(s) => texts.push(s),
        Value::Array(blocks) => {
            for block in blocks {
                match str_at(block, "type") {
                    Some("text") => texts.extend(str_at(block, "text")),
                    Some("image") => *images = true,
                    Some("tool_result") => {
                        for inner in array(block.get("content")) {
                            match str_at(inner, "type") {
                                Some("text") => texts.extend(str_at(inner, "text")),
                                Some("image") => *images = true,
                                _ => {}
                            }
                        }
                        texts.extend(str_at(block, "content"));
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn read_anthropic(body: &Value) -> Prompt<'_> {
    let mut p = Prompt::default();
    if let Some(system) = body.get("system") {
        read_anthropic_content(system, &mut p.system, &mut p.images);
    }
    for message in array(body.get("messages")) {
        let mut texts = Vec::new();
        if let Some(content) = message.get("content") {
            read_anthropic_content(content, &mut texts, &mut p.images);
        }
        p.turns.push(Turn {
            from_user: str_at(message, "role") == Some("user"),
            texts,
        });
    }
    p.tools = non_empty_array(body.get("tools"));
    p.effort_high = body
        .get("thinking")
        .and_then(|t| str_at(t, "type"))
        .is_some_and(|t| t == "enabled");
    p.max_output_tokens = body.get("max_tokens").and_then(Value::as_u64);
    p
}

fn read_gemini_parts<'v>(parts: &'v [Value], texts: &mut Vec<&'v str>, images: &mut bool) {
    for part in parts {
        texts.extend(str_at(part, "text"));
        if part.get("inlineData").is_some() || part.get("fileData").is_some() {
            *images = true;
        }
    }
}

fn read_gemini(body: &Value) -> Prompt<'_> {
    let mut p = Prompt::default();
    if let Some(system) = body.get("systemInstruction") {
        read_gemini_parts(array(system.get("parts")), &mut p.system, &mut p.images);
    }
    for content in array(body.get("contents")) {
        let mut texts = Vec::new();
        read_gemini_parts(array(content.get("parts")), &mut texts, &mut p.images);
        // Gemini's role defaults to user; the assistant is "model".
        p.turns.push(Turn {
            from_user: str_at(content, "role") != Some("model"),
            texts,
        });
    }
    p.tools = non_empty_array(body.get("tools"));
    if let Some(config) = body.get("generationConfig") {
        p.max_output_tokens = config.get("maxOutputTokens").and_then(Value::as_u64);
        p.json_mode = str_at(config, "responseMimeType") == Some("application/json")
            || config.get("responseSchema").is_some()
            || config.get("responseJsonSchema").is_some();
        if let Some(thinking) = config.get("thinkingConfig") {
            p.effort_high = thinking
                .get("thinkingBudget")
                .and_then(Value::as_i64)
                .is_some_and(|b| b > 0)
                || str_at(thinking, "thinkingLevel")
                    .is_some_and(|l| l.eq_ignore_ascii_case("high"));
        }
    }
    p
}

/// Bedrock Converse blocks are objects keyed by kind: `{"text": ...}`,
/// `{"image": ...}`, `{"toolResult": {"content": [...]}}`.
fn read_converse_blocks<'v>(blocks: &'v [Value], texts: &mut Vec<&'v str>, images: &mut bool) {
    for block in blocks {
        texts.extend(str_at(block, "text"));
        if block.get("image").is_some() {
            *images = true;
        }
        if let Some(result) = block.get("toolResult") {
            for inner in array(result.get("content")) {
                texts.extend(str_at(inner, "text"));
                if inner.get("image").is_some() {
                    *images = true;
                }
            }
        }
    }
}

fn read_converse(body: &Value) -> Prompt<'_> {
    let mut p = Prompt::default();
    read_converse_blocks(array(body.get("system")), &mut p.system, &mut p.images);
    for message in array(body.get("messages")) {
        let mut texts = Vec::new();
        read_converse_blocks(array(message.get("content")), &mut texts, &mut p.images);
        p.turns.push(Turn {
            from_user: str_at(message, "role") == Some("user"),
            texts,
        });
    }
    p.tools = non_empty_array(body.get("toolConfig").and_then(|t| t.get("tools")));
    p.max_output_tokens = body
        .get("inferenceConfig")
        .and_then(|c| c.get("maxTokens"))
        .and_then(Value::as_u64);
    // Claude on Bedrock takes Anthropic's thinking switch here.
    p.effort_high = body
        .get("additionalModelRequestFields")
        .and_then(|f| f.get("thinking"))
        .and_then(|t| str_at(t, "type"))
        .is_some_and(|t| t == "enabled");
    p
}

fn looks_like_code<'t>(texts: impl Iterator<Item = &'t str>) -> bool {
    let mut seen = [false; CODE_TOKENS.len()];
    let mut punct = 0;
    let mut bytes = 0;
    for text in texts {
        if text.contains("```") {
            return true;
        }
        for (token, hit) in CODE_TOKENS.iter().zip(seen.iter_mut()) {
            *hit = *hit || text.contains(token);
        }
        punct += text
            .bytes()
            .filter(|b| matches!(b, b'{' | b'}' | b';'))
            .count();
        bytes += text.len();
    }
    seen.iter().filter(|&&hit| hit).count() >= CODE_TOKENS_MIN
        || (punct >= CODE_PUNCT_MIN && punct * 1000 >= bytes * CODE_PUNCT_PER_MILLE)
}

/// Sum of the weights of the reasoning-term groups found in `texts`.
fn reasoning_terms(texts: &[&str]) -> usize {
    let mut found = [false; REASONING_TERMS.len()];
    for text in texts {
        let lower = text.to_ascii_lowercase();
        for ((words, _), hit) in REASONING_TERMS.iter().zip(found.iter_mut()) {
            *hit = *hit || words.iter().any(|w| contains_word(&lower, w));
        }
    }
    REASONING_TERMS
        .iter()
        .zip(found)
        .filter(|(_, hit)| *hit)
        .map(|((_, weight), _)| weight)
        .sum()
}

/// `word` occurs in `text` with no letter, digit or `_` right around it
/// (so "prove" is not found in "improve").
fn contains_word(text: &str, word: &str) -> bool {
    let is_word_char = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text.get(..at).and_then(|s| s.chars().next_back());
        let after = text.get(at + word.len()..).and_then(|s| s.chars().next());
        !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cand(id: usize, name: &str) -> Candidate<'_> {
        Candidate {
            id,
            name,
            weight: 1,
            available: true,
            ..Candidate::default()
        }
    }

    fn all_caps() -> Capabilities {
        Capabilities {
            tools: true,
            vision: true,
            json_mode: true,
            context_window: Some(128_000),
            region: Some("eu-west-1".into()),
            zero_retention: true,
        }
    }

    fn stats(latency_ms: f64, ttft_ms: Option<f64>, samples: u32) -> Option<LatencyStats> {
        Some(LatencyStats {
            latency_ms,
            ttft_ms,
            samples,
        })
    }

    fn decide_ok(strategy: &Strategy, candidates: &[Candidate], needs: &Needs) -> Decision {
        decide(strategy, candidates, needs, 0).unwrap()
    }

    #[test]
    fn ordered_keeps_configured_order() {
        let cs = [cand(7, "a"), cand(3, "b"), cand(5, "c")];
        let d = decide_ok(&Strategy::Ordered, &cs, &Needs::default());
        assert_eq!(d.order, vec![7, 3, 5]);
        assert_eq!(d.reason, "ordered");
    }

    #[test]
    fn weighted_first_pick_is_exactly_proportional() {
        let weights = [1, 3, 0, 6];
        let cs: Vec<Candidate> = ["a", "b", "c", "d"]
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (name, weight))| Candidate {
                weight,
                ..cand(i, name)
            })
            .collect();
        let total: u64 = 10;
        let rounds = 7;
        let mut firsts = [0u64; 4];
        for roll in 0..total * rounds {
            let d = decide(&Strategy::Weighted, &cs, &Needs::default(), roll).unwrap();
            let first = d.order[0];
            firsts[first] += 1;
            assert_eq!(d.reason, format!("weighted:{}", cs[first].name));
            // The rest follow in configured order.
            let rest: Vec<usize> = (0..4).filter(|&i| i != first).collect();
            assert_eq!(d.order[1..], rest[..]);
        }
        assert_eq!(firsts, weights.map(|w| u64::from(w) * rounds));
        // Huge rolls wrap around the same way.
        let d = decide(&Strategy::Weighted, &cs, &Needs::default(), u64::MAX).unwrap();
        assert_eq!(d.order[0], 3, "u64::MAX % 10 = 5 falls in d's share 4..10");
    }

    #[test]
    fn weighted_all_zero_keeps_configured_order() {
        let cs = [
            Candidate {
                weight: 0,
                ..cand(0, "a")
            },
            Candidate {
                weight: 0,
                ..cand(1, "b")
            },
        ];
        for roll in [0, 1, 99] {
            let d = decide(&Strategy::Weighted, &cs, &Needs::default(), roll).unwrap();
            assert_eq!(d.order, vec![0, 1]);
            assert_eq!(d.reason, "weighted:a");
        }
    }

    fn priced(id: usize, name: &str, input: Option<u64>, output: Option<u64>) -> Candidate<'_> {
        Candidate {
            input_price: input,
            output_price: output,
            ..cand(id, name)
        }
    }

    #[test]
    fn lowest_cost_orders_by_estimate_and_puts_unknown_last() {
        let needs = Needs {
            prompt_tokens: 1000,
            max_output_tokens: Some(100),
            ..Needs::default()
        };
        let cs = [
            priced(0, "unknown", None, Some(1)),
            priced(1, "dear", Some(5_000_000), Some(15_000_000)),
            priced(2, "half-known", Some(1), None),
            priced(3, "cheap", Some(150_000), Some(600_000)),
            priced(4, "cheap-too", Some(150_000), Some(600_000)),
        ];
        let d = decide_ok(&Strategy::LowestCost, &cs, &needs);
        assert_eq!(
            d.order,
            vec![3, 4, 1, 0, 2],
            "ties and unknowns keep configured order"
        );
        assert_eq!(d.reason, "lowest_cost");
    }

    #[test]
    fn lowest_cost_assumes_default_output_without_a_limit() {
        // input-heavy: 10 * 1000 = 10_000; output-heavy: 100 * out.
        let cs = [
            priced(0, "input-heavy", Some(10), Some(0)),
            priced(1, "output-heavy", Some(0), Some(100)),
        ];
        let mut needs = Needs {
            prompt_tokens: 1000,
            ..Needs::default()
        };
        // 100 * DEFAULT_OUTPUT_TOKENS (512) = 51_200 > 10_000.
        assert_eq!(decide_ok(&Strategy::LowestCost, &cs, &needs).order, [0, 1]);
        needs.max_output_tokens = Some(50); // 5_000 < 10_000
        assert_eq!(decide_ok(&Strategy::LowestCost, &cs, &needs).order, [1, 0]);
    }

    #[test]
    fn lowest_latency_explores_then_sorts_by_ttft_on_streams() {
        let timed = |id, name, latency| Candidate {
            latency,
            ..cand(id, name)
        };
        let cs = [
            timed(0, "slow", stats(500.0, Some(50.0), 10)),
            timed(1, "never", None),
            timed(2, "fast", stats(100.0, Some(90.0), 10)),
            timed(3, "young", stats(10.0, Some(1.0), MIN_LATENCY_SAMPLES - 1)),
            timed(4, "no-ttft", stats(70.0, None, MIN_LATENCY_SAMPLES)),
        ];
        let mut needs = Needs::default();
        let d = decide_ok(&Strategy::LowestLatency, &cs, &needs);
        assert_eq!(d.order, vec![1, 3, 4, 2, 0]);
        assert_eq!(d.reason, "lowest_latency");
        needs.stream = true;
        // Streams compare time to first token where known: 50 < 70 < 90.
        assert_eq!(
            decide_ok(&Strategy::LowestLatency, &cs, &needs).order,
            vec![1, 3, 0, 4, 2]
        );
    }

    fn scored_candidates() -> [Candidate<'static>; 3] {
        [
            Candidate {
                quality: Some(0.5),
                latency: stats(100.0, None, 5),
                ..priced(0, "a", Some(1), Some(1))
            },
            Candidate {
                quality: Some(0.9),
                latency: stats(300.0, None, 5),
                ..priced(1, "b", Some(2), Some(2))
            },
            priced(2, "c", Some(3), Some(3)),
        ]
    }

    #[test]
    fn scored_matches_hand_computed_scores() {
        // Costs at 1000 in + 100 out: a 1100, b 2200, c 3300.
        // price:   a 1, b (3300-2200)/2200 = 0.5, c 0
        // latency: a 1, b 0, c missing 0
        // quality: a 0, b 1, c missing 0
        let cs = scored_candidates();
        let needs = Needs {
            prompt_tokens: 1000,
            max_output_tokens: Some(100),
            ..Needs::default()
        };
        let pool: Vec<&Candidate> = cs.iter().collect();
        let cases = [
            // (price, latency, quality) -> scores a, b, c and the order
            ((1.0, 1.0, 1.0), [2.0, 1.5, 0.0], [0, 1, 2]),
            ((1.0, 0.0, 3.0), [1.0, 3.5, 0.0], [1, 0, 2]),
            ((0.0, 0.0, 0.0), [0.0, 0.0, 0.0], [0, 1, 2]),
            ((0.0, 2.0, 0.0), [2.0, 0.0, 0.0], [0, 1, 2]),
        ];
        for ((price, latency, quality), want_scores, want_order) in cases {
            let weights = ScoreWeights {
                price,
                latency,
                quality,
            };
            assert_eq!(scores(&pool, &needs, &weights), want_scores, "{weights:?}");
            let d = decide_ok(&Strategy::Scored(weights), &cs, &needs);
            assert_eq!(d.order, want_order, "{weights:?}");
            assert_eq!(d.reason, "scored");
        }
    }

    #[test]
    fn normalise_edge_cases() {
        assert_eq!(normalise(&[Some(2.0), Some(2.0)], false), [1.0, 1.0]);
        assert_eq!(normalise(&[Some(4.0), None], true), [1.0, 0.0]);
        assert_eq!(normalise(&[None, None], true), [0.0, 0.0]);
        assert_eq!(
            normalise(&[Some(f64::NAN), Some(0.0), Some(10.0)], true),
            [0.0, 0.0, 1.0]
        );
        assert_eq!(
            normalise(&[Some(0.0), Some(5.0), Some(10.0)], false),
            [1.0, 0.5, 0.0]
        );
    }

    #[test]
    fn capability_filter_drops_and_names_filtered() {
        let full = Candidate {
            caps: all_caps(),
            ..cand(0, "full")
        };
        let bare = cand(1, "bare");
        let small = Candidate {
            caps: Capabilities {
                context_window: Some(1100),
                ..all_caps()
            },
            ..cand(2, "small")
        };
        let cs = [bare, small, full];
        let cases: Vec<(Needs, Vec<usize>, &str)> = vec![
            (Needs::default(), vec![1, 2, 0], "ordered"),
            (
                Needs {
                    tools: true,
                    ..Needs::default()
                },
                vec![2, 0],
                "ordered;filtered=bare",
            ),
            (
                // Exactly the window fits; an unknown window is never filtered.
                Needs {
                    prompt_tokens: 1000,
                    max_output_tokens: Some(100),
                    ..Needs::default()
                },
                vec![1, 2, 0],
                "ordered",
            ),
            (
                Needs {
                    json_mode: true,
                    prompt_tokens: 1001,
                    max_output_tokens: Some(100),
                    ..Needs::default()
                },
                vec![0],
                "ordered;filtered=bare,small",
            ),
            (
                Needs {
                    regions: Some(vec!["eu-central-1".into(), "eu-west-1".into()]),
                    zero_retention: true,
                    ..Needs::default()
                },
                vec![2, 0],
                "ordered;filtered=bare",
            ),
        ];
        for (needs, order, reason) in cases {
            let d = decide_ok(&Strategy::Ordered, &cs, &needs);
            assert_eq!((d.order, d.reason.as_str()), (order, reason), "{needs:?}");
        }
    }

    #[test]
    fn no_target_messages_name_needs_and_candidates() {
        let gpt35 = Candidate {
            caps: Capabilities {
                tools: true,
                ..Capabilities::default()
            },
            ..cand(0, "gpt-3.5")
        };
        let us = Candidate {
            caps: Capabilities {
                vision: true,
                region: Some("us-east-1".into()),
                context_window: Some(8000),
                ..Capabilities::default()
            },
            ..cand(1, "us")
        };
        let cases: Vec<(Vec<Candidate>, Needs, &str)> = vec![
            (vec![], Needs::default(), "this route has no targets"),
            (
                vec![gpt35.clone()],
                Needs {
                    vision: true,
                    ..Needs::default()
                },
                "no target of this route supports images (gpt-3.5: no vision)",
            ),
            (
                vec![gpt35.clone(), us.clone()],
                Needs {
                    tools: true,
                    vision: true,
                    ..Needs::default()
                },
                "no target of this route supports tools and images \
                 (gpt-3.5: no vision; us: no tools)",
            ),
            (
                vec![us.clone()],
                Needs {
                    prompt_tokens: 10_000,
                    max_output_tokens: Some(100),
                    json_mode: true,
                    ..Needs::default()
                },
                "no target of this route supports JSON mode and a 10100-token context \
                 (us: no JSON mode, context window 8000 < 10100 tokens)",
            ),
            (
                vec![us.clone(), gpt35.clone()],
                Needs {
                    regions: Some(vec!["eu-west-1".into()]),
                    zero_retention: true,
                    ..Needs::default()
                },
                "no target of this route supports data residency in the allowed regions \
                 and zero data retention (us: region us-east-1, retains data; \
                 gpt-3.5: no region, retains data)",
            ),
            (
                vec![us],
                Needs {
                    regions: Some(vec![]),
                    ..Needs::default()
                },
                "no target of this route supports data residency in the allowed regions \
                 (us: region us-east-1)",
            ),
        ];
        for (cs, needs, message) in cases {
            let err = decide(&Strategy::Ordered, &cs, &needs, 0).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn no_target_lists_every_rejection() {
        let cs = [cand(0, "a"), cand(1, "b")];
        let needs = Needs {
            tools: true,
            ..Needs::default()
        };
        let err = decide(&Strategy::LowestCost, &cs, &needs, 0).unwrap_err();
        let rejected = |name: &str| Rejected {
            name: name.into(),
            unmet: vec![Unmet::Tools],
        };
        assert_eq!(
            err,
            NoTarget::Unsupported(vec![rejected("a"), rejected("b")])
        );
    }

    #[test]
    fn health_skips_cooling_targets_unless_all_are() {
        let down = |id, name| Candidate {
            available: false,
            ..cand(id, name)
        };
        let cs = [down(0, "a"), cand(1, "b"), down(2, "c")];
        let d = decide_ok(&Strategy::Ordered, &cs, &Needs::default());
        assert_eq!(d.order, vec![1]);
        assert_eq!(d.reason, "ordered;skipped=a,c");

        // All cooling: probe them anyway, strategy still applies.
        let cs = [
            Candidate {
                input_price: Some(9),
                output_price: Some(9),
                ..down(0, "a")
            },
            Candidate {
                input_price: Some(1),
                output_price: Some(1),
                ..down(1, "b")
            },
        ];
        let d = decide_ok(&Strategy::LowestCost, &cs, &Needs::default());
        assert_eq!(d.order, vec![1, 0]);
        assert_eq!(d.reason, "lowest_cost;all_unavailable");
    }

    #[test]
    fn health_applies_after_capabilities_and_weights_skip_cooling() {
        let cs = [
            Candidate {
                weight: 100,
                available: false,
                caps: all_caps(),
                ..cand(0, "heavy")
            },
            Candidate {
                caps: all_caps(),
                ..cand(1, "light")
            },
            cand(2, "no tools"),
        ];
        let needs = Needs {
            tools: true,
            ..Needs::default()
        };
        for roll in 0..10 {
            let d = decide(&Strategy::Weighted, &cs, &needs, roll).unwrap();
            assert_eq!(d.order, vec![1]);
            assert_eq!(d.reason, "weighted:light;filtered=no_tools;skipped=heavy");
        }
    }

    #[test]
    fn reason_names_are_sanitised() {
        let mut out = String::new();
        push_names(&mut out, ["gpt 4o;x=1", "a/b:c.d-e_f", "é(,)"].into_iter());
        assert_eq!(out, "gpt_4o_x_1,a/b:c.d-e_f,____");
    }

    #[test]
    fn auto_puts_chosen_tier_first() {
        let tiered = |id, name, tier| Candidate {
            tier,
            ..cand(id, name)
        };
        let cs = [
            tiered(0, "cheap", Tier::Simple),
            tiered(1, "strong", Tier::Hard),
            tiered(2, "any", Tier::Any),
            tiered(3, "cheap2", Tier::Simple),
        ];
        let verdict = |hard, why: &[&'static str]| Needs {
            auto_hard: Some(AutoVerdict {
                hard,
                why: why.to_vec(),
            }),
            ..Needs::default()
        };
        let cases = [
            (
                verdict(true, &["code", "long"]),
                vec![1, 2, 0, 3],
                "auto:hard(code,long)",
            ),
            (verdict(false, &[]), vec![0, 2, 3, 1], "auto:simple"),
            (
                verdict(false, &["turns"]),
                vec![0, 2, 3, 1],
                "auto:simple(turns)",
            ),
            (Needs::default(), vec![0, 1, 2, 3], "auto"),
        ];
        for (needs, order, reason) in cases {
            let d = decide_ok(&Strategy::Auto, &cs, &needs);
            assert_eq!((d.order, d.reason.as_str()), (order, reason));
        }
    }

    fn openai_user(text: &str) -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": text}]})
    }

    #[test]
    fn classify_table() {
        let long = "Summarise this report. ".repeat(100);
        let many_turns = |last: &str| {
            let mut messages: Vec<Value> = (0..10)
                .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "ok"}))
                .collect();
            messages.push(json!({"role": "user", "content": last}));
            json!({"messages": messages})
        };
        let with = |extra: Value| {
            let mut body = openai_user("Hello there");
            if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
                body.extend(extra.clone());
            }
            body
        };
        let cases: Vec<(Value, bool, Vec<&str>)> = vec![
            (openai_user("What is the capital of France?"), false, vec![]),
            (openai_user("Translate 'hello' to Spanish"), false, vec![]),
            (openai_user("Say hi"), false, vec![]),
            (
                openai_user("Write a haiku about autumn leaves."),
                false,
                vec![],
            ),
            (openai_user("How can I improve my sleep?"), false, vec![]),
            (
                openai_user("Why is the sky blue?"),
                false,
                vec!["reasoning"],
            ),
            (
                openai_user("Let me know which class to import for the trip."),
                false,
                vec![],
            ),
            (many_turns("thanks"), false, vec!["turns"]),
            (many_turns("why?"), true, vec!["turns", "reasoning"]),
            (
                openai_user("Prove that there are infinitely many primes."),
                true,
                vec!["reasoning"],
            ),
            (
                openai_user("Compare quicksort and mergesort: what is the complexity?"),
                true,
                vec!["reasoning"],
            ),
            (
                openai_user("Explain step by step how to derive the quadratic formula"),
                true,
                vec!["reasoning"],
            ),
            (
                openai_user("```rust\nfn main() {}\n```\nWhat does this print?"),
                true,
                vec!["code"],
            ),
            (
                openai_user("def f(x):\n    return x * 2\nclass A: pass"),
                true,
                vec!["code"],
            ),
            (
                openai_user("SELECT id FROM users WHERE a != b;"),
                false,
                vec![],
            ),
            (
                openai_user("{\"a\":{\"b\":1};\"c\":{\"d\":2};\"e\":{}}"),
                true,
                vec!["code"],
            ),
            (openai_user(&long), true, vec!["long"]),
            (
                openai_user(&format!("why? ```{long}```")),
                true,
                vec!["long", "code", "reasoning"],
            ),
            (
                with(json!({"tools": [{"type": "function"}]})),
                true,
                vec!["tools"],
            ),
            (with(json!({"tools": []})), false, vec![]),
            (
                with(json!({"response_format": {"type": "json_schema"}})),
                true,
                vec!["json"],
            ),
            (
                with(json!({"response_format": {"type": "text"}})),
                false,
                vec![],
            ),
            (
                with(json!({"reasoning_effort": "high"})),
                true,
                vec!["effort"],
            ),
            (with(json!({"reasoning_effort": "low"})), false, vec![]),
            (
                json!({"messages": [{"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
                ]}]}),
                true,
                vec!["images"],
            ),
            (
                // The system prompt does not count for reasoning or code.
                json!({"messages": [
                    {"role": "system", "content": "Think step by step. ```fn x() {}```"},
                    {"role": "user", "content": "Say hi"}
                ]}),
                false,
                vec![],
            ),
        ];
        for (body, hard, why) in cases {
            let verdict = classify(&prompt_features(Schema::OpenAi, &body));
            assert_eq!(verdict, AutoVerdict { hard, why }, "{body}");
        }
    }

    #[test]
    fn classify_points_at_the_thresholds() {
        let at = |last_user_chars, total_chars| PromptFeatures {
            last_user_chars,
            total_chars,
            ..PromptFeatures::default()
        };
        assert!(!classify(&at(LONG_LAST_USER_CHARS, LONG_TOTAL_CHARS)).hard);
        assert!(classify(&at(LONG_LAST_USER_CHARS + 1, 0)).hard);
        assert!(classify(&at(0, LONG_TOTAL_CHARS + 1)).hard);
        let reasoning = |reasoning_terms| PromptFeatures {
            reasoning_terms,
            ..PromptFeatures::default()
        };
        assert!(!classify(&reasoning(1)).hard);
        assert!(classify(&reasoning(2)).hard);
        assert!(classify(&reasoning(usize::MAX)).hard);
    }

    #[test]
    fn reasoning_terms_match_whole_words_once_per_group() {
        let cases = [
            ("Why?", 1),
            ("WHY, oh why", 1),
            ("improve the approval", 0),
            ("prove it, then proofs", 2),
            ("why compare the algorithms", 3),
            ("step-by-step trade-offs", 3),
            ("debugger analyses", 0),
            ("", 0),
        ];
        for (text, want) in cases {
            assert_eq!(reasoning_terms(&[text]), want, "{text}");
        }
        assert_eq!(reasoning_terms(&["why", "theorem"]), 3);
    }

    #[test]
    fn openai_needs_and_features() {
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
                ]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "Why?"}
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_object"},
            "max_completion_tokens": 300,
            "max_tokens": 100,
            "reasoning_effort": "high"
        });
        // 9 + 22 + 6 + 4 = 41 chars -> 11 tokens.
        assert_eq!(
            needs_from(Schema::OpenAi, &body, true),
            Needs {
                tools: true,
                vision: true,
                json_mode: true,
                prompt_tokens: 11,
                max_output_tokens: Some(300),
                stream: true,
                ..Needs::default()
            }
        );
        assert_eq!(
            prompt_features(Schema::OpenAi, &body),
            PromptFeatures {
                last_user_chars: 4,
                total_chars: 41,
                turns: 3,
                has_code: false,
                reasoning_terms: 1,
                tools: true,
                images: true,
                json_mode: true,
                reasoning_effort_high: true,
            }
        );
        let legacy =
            json!({"messages": [{"role": "developer", "content": "abcde"}], "max_tokens": 7});
        let needs = needs_from(Schema::OpenAi, &legacy, false);
        assert_eq!((needs.prompt_tokens, needs.max_output_tokens), (2, Some(7)));
        assert_eq!(prompt_features(Schema::OpenAi, &legacy).turns, 0);
    }

    #[test]
    fn anthropic_needs_and_features() {
        let body = json!({
            "model": "m",
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Describe"},
                    {"type": "image", "source": {"type": "base64", "data": "AA"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t", "name": "f", "input": {"q": "long input"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": "42 degrees"},
                    {"type": "text", "text": "Prove it."}
                ]}
            ],
            "tools": [{"name": "f", "input_schema": {}}],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "max_tokens": 2000
        });
        // 9 + 8 + 10 + 9 = 36 chars -> 9 tokens; tool_use input is not counted.
        assert_eq!(
            needs_from(Schema::Anthropic, &body, false),
            Needs {
                tools: true,
                vision: true,
                prompt_tokens: 9,
                max_output_tokens: Some(2000),
                ..Needs::default()
            }
        );
        assert_eq!(
            prompt_features(Schema::Anthropic, &body),
            PromptFeatures {
                last_user_chars: 19,
                total_chars: 36,
                turns: 3,
                has_code: false,
                reasoning_terms: 2,
                tools: true,
                images: true,
                json_mode: false,
                reasoning_effort_high: true,
            }
        );
        // String system and content; an image only inside a tool result.
        let body = json!({
            "system": "abc",
            "messages": [{"role": "user", "content": [{"type": "tool_result", "content": [
                {"type": "text", "text": "defg"},
                {"type": "image", "source": {}}
            ]}]}],
            "thinking": {"type": "disabled"}
        });
        let f = prompt_features(Schema::Anthropic, &body);
        assert_eq!((f.total_chars, f.last_user_chars, f.images), (7, 4, true));
        assert!(!f.reasoning_effort_high);
    }

    #[test]
    fn gemini_needs_and_features() {
        let body = json!({
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "contents": [
                {"role": "user", "parts": [
                    {"text": "What is this?"},
                    {"inlineData": {"mimeType": "image/png", "data": "AA"}}
                ]},
                {"role": "model", "parts": [{"text": "A dog."}]},
                {"parts": [{"text": "Compare it to a wolf."}]}
            ],
            "tools": [{"functionDeclarations": [{"name": "f"}]}],
            "generationConfig": {
                "maxOutputTokens": 256,
                "responseMimeType": "application/json",
                "thinkingConfig": {"thinkingBudget": 2048}
            }
        });
        // 9 + 13 + 6 + 21 = 49 chars -> 13 tokens.
        assert_eq!(
            needs_from(Schema::Gemini, &body, true),
            Needs {
                tools: true,
                vision: true,
                json_mode: true,
                prompt_tokens: 13,
                max_output_tokens: Some(256),
                stream: true,
                ..Needs::default()
            }
        );
        assert_eq!(
            prompt_features(Schema::Gemini, &body),
            PromptFeatures {
                last_user_chars: 21,
                total_chars: 49,
                turns: 3,
                has_code: false,
                reasoning_terms: 1,
                tools: true,
                images: true,
                json_mode: true,
                reasoning_effort_high: true,
            }
        );
        let body = json!({
            "contents": [{"role": "user", "parts": [{"fileData": {"fileUri": "gs://x"}}]}],
            "generationConfig": {"thinkingConfig": {"thinkingBudget": 0}, "responseMimeType": "text/plain"}
        });
        let f = prompt_features(Schema::Gemini, &body);
        assert!(f.images && !f.json_mode && !f.reasoning_effort_high);
        let body = json!({"generationConfig": {"thinkingConfig": {"thinkingLevel": "HIGH"}}});
        assert!(prompt_features(Schema::Gemini, &body).reasoning_effort_high);
    }

    #[test]
    fn converse_needs_and_features() {
        let body = json!({
            "system": [{"text": "Be brief."}],
            "messages": [
                {"role": "user", "content": [
                    {"text": "Hi"},
                    {"image": {"format": "png", "source": {"bytes": "AA"}}}
                ]},
                {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t", "name": "f", "input": {}}}]},
                {"role": "user", "content": [{"toolResult": {"toolUseId": "t", "content": [{"text": "sunny"}]}}]}
            ],
            "toolConfig": {"tools": [{"toolSpec": {"name": "f"}}]},
            "inferenceConfig": {"maxTokens": 100},
            "additionalModelRequestFields": {"thinking": {"type": "enabled"}}
        });
        // 9 + 2 + 5 = 16 chars -> 4 tokens.
        assert_eq!(
            needs_from(Schema::Converse, &body, false),
            Needs {
                tools: true,
                vision: true,
                prompt_tokens: 4,
                max_output_tokens: Some(100),
                ..Needs::default()
            }
        );
        let f = prompt_features(Schema::Converse, &body);
        assert_eq!((f.last_user_chars, f.turns), (5, 3));
        assert!(f.reasoning_effort_high);
    }

    #[test]
    fn malformed_bodies_read_as_empty() {
        for schema in [
            Schema::OpenAi,
            Schema::Anthropic,
            Schema::Gemini,
            Schema::Converse,
        ] {
            for body in [
                json!({}),
                json!("text"),
                json!({"messages": "x", "contents": 3, "system": 1, "tools": {}}),
                json!({"messages": [1, {"content": 2}], "max_tokens": -1}),
            ] {
                assert_eq!(
                    needs_from(schema, &body, false),
                    Needs::default(),
                    "{schema:?} {body}"
                );
                let f = prompt_features(schema, &body);
                assert_eq!(f.total_chars, 0, "{schema:?} {body}");
                assert!(!classify(&f).hard);
            }
        }
    }

    #[test]
    fn prompt_tokens_count_chars_not_bytes() {
        // 5 chars in 10 bytes -> 2 tokens.
        let needs = needs_from(Schema::OpenAi, &openai_user("ééééé"), false);
        assert_eq!(needs.prompt_tokens, 2);
    }

    #[test]
    fn auto_end_to_end_from_a_request() {
        let cs = [
            Candidate {
                tier: Tier::Simple,
                caps: all_caps(),
                ..cand(0, "mini")
            },
            Candidate {
                tier: Tier::Hard,
                caps: all_caps(),
                ..cand(1, "big")
            },
        ];
        let route = |body: &Value| {
            let mut needs = needs_from(Schema::OpenAi, body, false);
            needs.auto_hard = Some(classify(&prompt_features(Schema::OpenAi, body)));
            decide_ok(&Strategy::Auto, &cs, &needs)
        };
        let d = route(&openai_user("Say hi"));
        assert_eq!((d.order, d.reason.as_str()), (vec![0, 1], "auto:simple"));
        let d = route(&openai_user("Why does this fail? ```x```"));
        assert_eq!(
            (d.order, d.reason.as_str()),
            (vec![1, 0], "auto:hard(code,reasoning)")
        );
    }
}
