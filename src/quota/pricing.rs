//! Cost accounting in integer micro-dollars, and a built-in table of list
//! prices for the common models so that a config without a `price` object
//! still gets costs. A model's `price` in the config always wins over the
//! table; the table is only a default.
//!
//! The table holds standard-tier list prices (no batch or priority tier,
//! the short-context tier where a model has two, global rather than
//! regional endpoints) as of [`PRICES_AS_OF`]. Anthropic cache writes, long
//! prompts, audio and image tokens cost more than these rows say; a config
//! that needs them exact sets `price`.

use crate::core::usage::Usage;
use Family::{Anthropic, Gemini, Nova, OpenAi};

/// A model's prices in micro-dollars per million tokens: $2.50/Mtok is
/// 2_500_000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub input: u64,
    pub output: u64,
    /// Price of prompt tokens read from a cache; `None` when the model has
    /// no discount for them, so they cost `input`.
    pub cached_input: Option<u64>,
}

/// The date the default table reflects, shown in docs and tests.
pub const PRICES_AS_OF: &str = "2025-11-30";

/// Who publishes a row's model; decides which providers may serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    OpenAi,
    Anthropic,
    Gemini,
    /// Amazon Nova, on Bedrock only.
    Nova,
}

struct Listing {
    family: Family,
    /// The model's base id, without snapshot or version suffix.
    name: &'static str,
    prices: Prices,
}

/// One table row; `cached` is `None` where the vendor lists no cached price.
const fn row(
    family: Family,
    name: &'static str,
    input: u64,
    output: u64,
    cached: Option<u64>,
) -> Listing {
    Listing {
        family,
        name,
        prices: Prices {
            input,
            output,
            cached_input: cached,
        },
    }
}

/// Micro-dollars per million tokens: input, output, cached input.
#[rustfmt::skip]
static TABLE: &[Listing] = &[
    // OpenAI (also Azure OpenAI, same list prices). Cached = cached input.
    row(OpenAi, "gpt-5", 1_250_000, 10_000_000, Some(125_000)),
    row(OpenAi, "gpt-5-chat", 1_250_000, 10_000_000, Some(125_000)),
    row(OpenAi, "gpt-5-mini", 250_000, 2_000_000, Some(25_000)),
    row(OpenAi, "gpt-5-nano", 50_000, 400_000, Some(5_000)),
    row(OpenAi, "gpt-5.1", 1_250_000, 10_000_000, Some(125_000)),
    row(OpenAi, "gpt-4.1", 2_000_000, 8_000_000, Some(500_000)),
    row(OpenAi, "gpt-4.1-mini", 400_000, 1_600_000, Some(100_000)),
    row(OpenAi, "gpt-4.1-nano", 100_000, 400_000, Some(25_000)),
    row(OpenAi, "gpt-4o", 2_500_000, 10_000_000, Some(1_250_000)),
    // The first gpt-4o snapshot kept its launch price and had no caching.
    row(OpenAi, "gpt-4o-2024-05-13", 5_000_000, 15_000_000, None),
    row(OpenAi, "gpt-4o-mini", 150_000, 600_000, Some(75_000)),
    // OpenAI reasoning models: reasoning tokens are billed as output.
    row(OpenAi, "o1", 15_000_000, 60_000_000, Some(7_500_000)),
    row(OpenAi, "o1-mini", 1_100_000, 4_400_000, Some(550_000)),
    row(OpenAi, "o3", 2_000_000, 8_000_000, Some(500_000)),
    row(OpenAi, "o3-mini", 1_100_000, 4_400_000, Some(550_000)),
    row(OpenAi, "o4-mini", 1_100_000, 4_400_000, Some(275_000)),
    // OpenAI embeddings: input only.
    row(OpenAi, "text-embedding-3-small", 20_000, 0, None),
    row(OpenAi, "text-embedding-3-large", 130_000, 0, None),
    row(OpenAi, "text-embedding-ada-002", 100_000, 0, None),
    // Anthropic (also on Vertex AI and Bedrock at the same list prices).
    // Cached = cache read; cache writes are billed above input but the
    // usage does not separate them, so they count as plain input.
    row(Anthropic, "claude-opus-4-5", 5_000_000, 25_000_000, Some(500_000)),
    row(Anthropic, "claude-opus-4-1", 15_000_000, 75_000_000, Some(1_500_000)),
    row(Anthropic, "claude-opus-4", 15_000_000, 75_000_000, Some(1_500_000)),
    row(Anthropic, "claude-sonnet-4-5", 3_000_000, 15_000_000, Some(300_000)),
    row(Anthropic, "claude-sonnet-4", 3_000_000, 15_000_000, Some(300_000)),
    row(Anthropic, "claude-haiku-4-5", 1_000_000, 5_000_000, Some(100_000)),
    row(Anthropic, "claude-3-7-sonnet", 3_000_000, 15_000_000, Some(300_000)),
    row(Anthropic, "claude-3-5-sonnet", 3_000_000, 15_000_000, Some(300_000)),
    row(Anthropic, "claude-3-5-haiku", 800_000, 4_000_000, Some(80_000)),
    row(Anthropic, "claude-3-opus", 15_000_000, 75_000_000, Some(1_500_000)),
    row(Anthropic, "claude-3-haiku", 250_000, 1_250_000, Some(30_000)),
    // Google Gemini (Gemini API paid tier; Vertex AI lists the same).
    // Text input, prompts up to 200k tokens (128k for 1.5); output includes
    // thinking tokens; cached = context-cache read.
    row(Gemini, "gemini-2.5-pro", 1_250_000, 10_000_000, Some(125_000)),
    row(Gemini, "gemini-2.5-flash", 300_000, 2_500_000, Some(30_000)),
    row(Gemini, "gemini-2.5-flash-lite", 100_000, 400_000, Some(10_000)),
    row(Gemini, "gemini-2.0-flash", 100_000, 400_000, Some(25_000)),
    row(Gemini, "gemini-2.0-flash-lite", 75_000, 300_000, None),
    row(Gemini, "gemini-1.5-pro", 1_250_000, 5_000_000, Some(312_500)),
    row(Gemini, "gemini-1.5-flash", 75_000, 300_000, Some(18_750)),
    row(Gemini, "gemini-1.5-flash-8b", 37_500, 150_000, Some(10_000)),
    row(Gemini, "gemini-embedding-001", 150_000, 0, None),
    // Amazon Nova on Bedrock (on-demand). Cached = cache read.
    row(Nova, "nova-pro", 800_000, 3_200_000, Some(200_000)),
    row(Nova, "nova-lite", 60_000, 240_000, Some(15_000)),
    row(Nova, "nova-micro", 35_000, 140_000, Some(8_750)),
];

/// Default list prices for `model_id` as `provider_kind` (a config provider
/// kind: "openai", "azure_openai", "openai_compatible", "anthropic",
/// "gemini", "vertex_ai", "bedrock") spells it, or `None` when the table
/// does not know the model.
///
/// The id is reduced to its last path segment (Gemini's "models/…",
/// Vertex resource names, Bedrock ARNs) and, on Bedrock, stripped of the
/// cross-region prefix ("us.", "global.", …) and vendor ("anthropic.",
/// "amazon."). The longest table name that is the whole id, or the id's
/// start followed by a version suffix, wins: "gpt-4o-mini-2024-07-18" is
/// gpt-4o-mini, never gpt-4o. A name followed by anything else is another
/// model ("gpt-4o-audio-preview" is priced per audio token: `None`).
///
/// `openai_compatible` hosts (Groq, Together, vLLM, …) price the same model
/// differently, so they get `None`; Azure OpenAI uses OpenAI's rows.
pub fn default_prices(provider_kind: &str, model_id: &str) -> Option<Prices> {
    let id = model_id.rsplit('/').next().unwrap_or(model_id);
    let (families, id): (&[Family], &str) = match provider_kind {
        "openai" | "azure_openai" => (&[OpenAi], id),
        "anthropic" => (&[Anthropic], id),
        "gemini" => (&[Gemini], id),
        "vertex_ai" => (&[Gemini, Anthropic], id),
        "bedrock" => bedrock_model(id)?,
        _ => return None,
    };
    TABLE
        .iter()
        .filter(|l| families.contains(&l.family))
        .filter(|l| id.strip_prefix(l.name).is_some_and(is_version_suffix))
        .max_by_key(|l| l.name.len())
        .map(|l| l.prices)
}

/// A Bedrock id's family and its name without region and vendor prefixes:
/// "us.anthropic.claude-…" and "anthropic.claude-…" are both "claude-…".
fn bedrock_model(id: &str) -> Option<(&'static [Family], &str)> {
    let vendor = |segment: &str| -> Option<&'static [Family]> {
        match segment {
            "anthropic" => Some(&[Anthropic]),
            "amazon" => Some(&[Nova]),
            _ => None,
        }
    };
    let (first, rest) = id.split_once('.')?;
    if let Some(families) = vendor(first) {
        return Some((families, rest));
    }
    let (second, name) = rest.split_once('.')?;
    Some((vendor(second)?, name))
}

/// Whether `rest`, what follows a table name in an id, only names a version
/// of that model: nothing, "-latest", "@…"/":…" with a digit (Vertex,
/// Bedrock), "-v2:0"/"-v2@…" (Bedrock, Vertex), or a snapshot of at least
/// three digits ("-001", "-0613", "-2024-08-06", "-20250514"). "-0" is
/// minor version zero ("claude-sonnet-4-0"); other short numbers are other
/// models ("claude-opus-4-5", "gemini-1.5-flash-8b") and never match.
fn is_version_suffix(rest: &str) -> bool {
    let starts_with_digit = |s: &str| s.bytes().next().is_some_and(|b| b.is_ascii_digit());
    if rest.is_empty() || rest == "-latest" {
        return true;
    }
    if let Some(after) = rest.strip_prefix('@').or_else(|| rest.strip_prefix(':')) {
        return starts_with_digit(after);
    }
    if let Some(after) = rest.strip_prefix("-v") {
        let tail = after.trim_start_matches(|c: char| c.is_ascii_digit());
        return tail.len() < after.len()
            && (tail.is_empty() || tail.starts_with(':') || tail.starts_with('@'));
    }
    let Some(after) = rest.strip_prefix('-') else {
        return false;
    };
    let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    digits >= 3 || after == "0"
}

/// The cost of `usage` at `prices` in micro-dollars, rounded up so that a
/// request that used tokens at a non-zero price never costs 0. Cached
/// tokens are part of `input_tokens` and cost `cached_input` (or `input`
/// when the model has no cache discount); reasoning tokens are part of
/// `output_tokens`. Saturates at `u64::MAX` instead of overflowing.
pub fn cost_micro_usd(prices: &Prices, usage: &Usage) -> u64 {
    // Prices are per million tokens.
    const MILLION: u128 = 1_000_000;
    let uncached = usage.input_tokens.saturating_sub(usage.cached_input_tokens);
    let cached_price = prices.cached_input.unwrap_or(prices.input);
    let term = |tokens: u64, price: u64| u128::from(tokens) * u128::from(price);
    let scaled = term(uncached, prices.input)
        .saturating_add(term(usage.cached_input_tokens, cached_price))
        .saturating_add(term(usage.output_tokens, prices.output));
    u64::try_from(scaled.div_ceil(MILLION)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn p(input: u64, output: u64, cached_input: Option<u64>) -> Prices {
        Prices {
            input,
            output,
            cached_input,
        }
    }

    const GPT_4O: Prices = p(2_500_000, 10_000_000, Some(1_250_000));
    const GPT_4O_MINI: Prices = p(150_000, 600_000, Some(75_000));
    const SONNET: Prices = p(3_000_000, 15_000_000, Some(300_000));
    const OPUS_4: Prices = p(15_000_000, 75_000_000, Some(1_500_000));
    const HAIKU_3_5: Prices = p(800_000, 4_000_000, Some(80_000));

    #[test]
    fn prices_as_of_is_an_iso_date() {
        let parts: Vec<&str> = PRICES_AS_OF.split('-').collect();
        assert_eq!(parts.iter().map(|s| s.len()).collect::<Vec<_>>(), [4, 2, 2]);
        assert!(PRICES_AS_OF
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'-'));
        assert!(PRICES_AS_OF.starts_with("2025-"));
    }

    #[test]
    fn lookups_by_provider_and_id() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, Option<Prices>)] = &[
            // OpenAI: bare names, dated snapshots, siblings never confused.
            ("openai", "gpt-4o", Some(GPT_4O)),
            ("openai", "gpt-4o-2024-08-06", Some(GPT_4O)),
            ("openai", "gpt-4o-2024-05-13", Some(p(5_000_000, 15_000_000, None))),
            ("openai", "gpt-4o-mini", Some(GPT_4O_MINI)),
            ("openai", "gpt-4o-mini-2024-07-18", Some(GPT_4O_MINI)),
            ("openai", "gpt-4.1-2025-04-14", Some(p(2_000_000, 8_000_000, Some(500_000)))),
            ("openai", "gpt-4.1-mini", Some(p(400_000, 1_600_000, Some(100_000)))),
            ("openai", "gpt-4.1-nano-2025-04-14", Some(p(100_000, 400_000, Some(25_000)))),
            ("openai", "o1-2024-12-17", Some(p(15_000_000, 60_000_000, Some(7_500_000)))),
            ("openai", "o3", Some(p(2_000_000, 8_000_000, Some(500_000)))),
            ("openai", "o3-mini-2025-01-31", Some(p(1_100_000, 4_400_000, Some(550_000)))),
            ("openai", "o4-mini", Some(p(1_100_000, 4_400_000, Some(275_000)))),
            ("openai", "gpt-5-2025-08-07", Some(p(1_250_000, 10_000_000, Some(125_000)))),
            ("openai", "gpt-5-mini", Some(p(250_000, 2_000_000, Some(25_000)))),
            ("openai", "gpt-5-nano", Some(p(50_000, 400_000, Some(5_000)))),
            ("openai", "gpt-5-chat-latest", Some(p(1_250_000, 10_000_000, Some(125_000)))),
            ("openai", "text-embedding-3-small", Some(p(20_000, 0, None))),
            ("openai", "text-embedding-3-large", Some(p(130_000, 0, None))),
            ("azure_openai", "gpt-4o-mini", Some(GPT_4O_MINI)),
            // Variants with other pricing are other models, not snapshots.
            ("openai", "gpt-4o-audio-preview", None),
            ("openai", "gpt-4o-mini-realtime-preview", None),
            ("openai", "chatgpt-4o-latest", None),
            ("openai", "ft:gpt-4o-mini-2024-07-18:org::abc", None),
            ("openai", "gpt-4", None),
            ("openai", "o1-preview", None),
            ("openai", "gpt-4o-", None),
            ("openai", "", None),
            // Anthropic.
            ("anthropic", "claude-sonnet-4-20250514", Some(SONNET)),
            ("anthropic", "claude-sonnet-4-0", Some(SONNET)),
            ("anthropic", "claude-sonnet-4-5-20250929", Some(SONNET)),
            ("anthropic", "claude-opus-4-20250514", Some(OPUS_4)),
            ("anthropic", "claude-opus-4-1-20250805", Some(OPUS_4)),
            ("anthropic", "claude-opus-4-5-20251101", Some(p(5_000_000, 25_000_000, Some(500_000)))),
            ("anthropic", "claude-haiku-4-5", Some(p(1_000_000, 5_000_000, Some(100_000)))),
            ("anthropic", "claude-3-7-sonnet-latest", Some(SONNET)),
            ("anthropic", "claude-3-5-sonnet-20241022", Some(SONNET)),
            ("anthropic", "claude-3-5-haiku-20241022", Some(HAIKU_3_5)),
            ("anthropic", "claude-3-haiku-20240307", Some(p(250_000, 1_250_000, Some(30_000)))),
            // A future minor version is unknown, not its predecessor's price.
            ("anthropic", "claude-opus-4-9", None),
            ("anthropic", "gpt-4o", None),
            // Vertex AI: Anthropic with '@' versions, and Gemini.
            ("vertex_ai", "claude-sonnet-4@20250514", Some(SONNET)),
            ("vertex_ai", "claude-3-5-sonnet-v2@20241022", Some(SONNET)),
            ("vertex_ai", "claude-3-5-haiku@20241022", Some(HAIKU_3_5)),
            ("vertex_ai", "gemini-2.5-flash", Some(p(300_000, 2_500_000, Some(30_000)))),
            ("vertex_ai", "publishers/google/models/gemini-2.0-flash-001", Some(p(100_000, 400_000, Some(25_000)))),
            ("vertex_ai", "gpt-4o", None),
            // Gemini API.
            ("gemini", "gemini-2.5-flash", Some(p(300_000, 2_500_000, Some(30_000)))),
            ("gemini", "gemini-2.5-flash-lite", Some(p(100_000, 400_000, Some(10_000)))),
            ("gemini", "models/gemini-2.5-pro", Some(p(1_250_000, 10_000_000, Some(125_000)))),
            ("gemini", "gemini-2.0-flash-001", Some(p(100_000, 400_000, Some(25_000)))),
            ("gemini", "gemini-2.0-flash-lite-001", Some(p(75_000, 300_000, None))),
            ("gemini", "gemini-1.5-pro-002", Some(p(1_250_000, 5_000_000, Some(312_500)))),
            ("gemini", "gemini-1.5-flash-latest", Some(p(75_000, 300_000, Some(18_750)))),
            ("gemini", "gemini-1.5-flash-8b", Some(p(37_500, 150_000, Some(10_000)))),
            ("gemini", "gemini-2.5-flash-preview-05-20", None),
            ("gemini", "gemini-2.0-flash-exp", None),
            ("gemini", "claude-sonnet-4@20250514", None),
            // Bedrock: vendor and cross-region prefixes, ARNs.
            ("bedrock", "anthropic.claude-3-5-haiku-20241022-v1:0", Some(HAIKU_3_5)),
            ("bedrock", "us.anthropic.claude-sonnet-4-20250514-v1:0", Some(SONNET)),
            ("bedrock", "eu.anthropic.claude-3-5-sonnet-20240620-v1:0", Some(SONNET)),
            ("bedrock", "apac.anthropic.claude-3-haiku-20240307-v1:0", Some(p(250_000, 1_250_000, Some(30_000)))),
            ("bedrock", "global.anthropic.claude-sonnet-4-5-20250929-v1:0", Some(SONNET)),
            ("bedrock", "anthropic.claude-3-5-sonnet-20241022-v2:0", Some(SONNET)),
            ("bedrock", "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-5-haiku-20241022-v1:0", Some(HAIKU_3_5)),
            ("bedrock", "amazon.nova-pro-v1:0", Some(p(800_000, 3_200_000, Some(200_000)))),
            ("bedrock", "us.amazon.nova-micro-v1:0", Some(p(35_000, 140_000, Some(8_750)))),
            ("bedrock", "claude-3-5-haiku-20241022", None),
            ("bedrock", "meta.llama3-1-70b-instruct-v1:0", None),
            ("bedrock", "us.amazon.claude-3-haiku-20240307-v1:0", None),
            // Hosts whose prices differ, and unknown kinds.
            ("openai_compatible", "gpt-4o", None),
            ("openai_compatible", "llama-3.3-70b-versatile", None),
            ("vertex", "gemini-2.5-flash", None),
            ("", "gpt-4o", None),
        ];
        for (kind, id, want) in cases {
            assert_eq!(default_prices(kind, id), *want, "{kind} {id}");
        }
    }

    #[test]
    fn version_suffixes() {
        let cases: &[(&str, bool)] = &[
            ("", true),
            ("-latest", true),
            ("-2024-08-06", true),
            ("-20250514", true),
            ("-001", true),
            ("-0613", true),
            ("-0", true),
            ("@20250514", true),
            ("@001", true),
            (":0", true),
            ("-v1:0", true),
            ("-v2@20241022", true),
            ("-v12", true),
            ("-20241022-v2:0", true),
            ("-5", false),
            ("-5-20251101", false),
            ("-8b", false),
            ("-01", false),
            ("-mini", false),
            ("-audio-preview", false),
            ("-latest-x", false),
            ("-v", false),
            ("-vx:0", false),
            ("-v1-x", false),
            ("@latest", false),
            (":", false),
            ("-", false),
            (".1", false),
            ("x", false),
        ];
        for (rest, want) in cases {
            assert_eq!(is_version_suffix(rest), *want, "{rest:?}");
        }
    }

    #[test]
    fn every_row_is_found_by_its_own_name() {
        for listing in TABLE {
            let kind = match listing.family {
                OpenAi => "openai",
                Anthropic => "anthropic",
                Gemini => "gemini",
                Nova => "bedrock",
            };
            let id = match listing.family {
                Nova => format!("amazon.{}-v1:0", listing.name),
                _ => listing.name.to_string(),
            };
            assert_eq!(default_prices(kind, &id), Some(listing.prices), "{id}");
            let cached = listing.prices.cached_input.unwrap_or(listing.prices.input);
            assert!(cached <= listing.prices.input, "{id}: cached above input");
        }
    }

    #[test]
    fn table_names_are_unique_per_family() {
        for (i, a) in TABLE.iter().enumerate() {
            for b in TABLE.iter().skip(i + 1) {
                assert!(a.family != b.family || a.name != b.name, "{}", a.name);
            }
        }
    }

    fn usage(input: u64, cached: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            reasoning_tokens: 0,
        }
    }

    #[test]
    fn cost_arithmetic() {
        #[rustfmt::skip]
        let cases: &[(&str, Prices, Usage, u64)] = &[
            ("zero usage", GPT_4O, usage(0, 0, 0), 0),
            ("zero prices", p(0, 0, Some(0)), usage(1_000, 500, 1_000), 0),
            // 1M input at $2.50 + 1M output at $10.
            ("exact", GPT_4O, usage(1_000_000, 0, 1_000_000), 12_500_000),
            // 1 token at $2.50/Mtok is 2.5 micro-dollars: 3.
            ("one token rounds up", GPT_4O, usage(1, 0, 0), 3),
            ("tiny price never free", p(1, 1, None), usage(1, 0, 0), 1),
            // 1000 uncached at 2.5 + 1000 cached at 1.25 + 100 out at 10.
            ("cached split", GPT_4O, usage(2_000, 1_000, 100), 2_500 + 1_250 + 1_000),
            // The sum is rounded once, not each part.
            ("rounded once", p(500_000, 500_000, None), usage(1, 0, 1), 1),
            ("cached falls back to input", p(2_000_000, 0, None), usage(1_000, 1_000, 0), 2_000),
            ("all cached", SONNET, usage(10_000, 10_000, 0), 3_000),
            // More cached than input (a bad report): the uncached part is 0
            // and the cached tokens are still charged.
            ("cached above input", SONNET, usage(10, 20, 0), 6),
            ("output only", p(0, 600_000, None), usage(0, 0, 5), 3),
            ("huge saturates", p(u64::MAX, u64::MAX, Some(u64::MAX)), usage(u64::MAX, 1, u64::MAX), u64::MAX),
            // u64::MAX tokens at $1/Mtok is exactly u64::MAX micro-dollars.
            ("huge but exact", p(1_000_000, 0, None), usage(u64::MAX, 0, 0), u64::MAX),
            ("huge doubled saturates", p(2_000_000, 0, None), usage(u64::MAX, 0, 0), u64::MAX),
        ];
        for (name, prices, usage, want) in cases {
            assert_eq!(cost_micro_usd(prices, usage), *want, "{name}");
        }
    }

    #[test]
    fn reasoning_tokens_are_not_charged_twice() {
        let mut with_reasoning = usage(0, 0, 1_000);
        with_reasoning.reasoning_tokens = 800;
        assert_eq!(
            cost_micro_usd(&GPT_4O, &with_reasoning),
            cost_micro_usd(&GPT_4O, &usage(0, 0, 1_000))
        );
    }
}
