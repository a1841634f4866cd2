//! The release's `conv_templates`, by name.
use super::{Conversation, Message, SeparatorStyle};
use crate::{Error, Result};

/// Every name the release's `conv_templates` knows, in its order.
pub const TEMPLATE_NAMES: [&str; 16] = [
    "default",
    "v0",
    "v1",
    "vicuna_v1",
    "llama_2",
    "mistral_instruct",
    "chatml_direct",
    "mistral_direct",
    "plain",
    "v0_plain",
    "llava_v0",
    "v0_mmtag",
    "llava_v1",
    "v1_mmtag",
    "llava_llama_2",
    "mpt",
];

const HUMAN_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.";
const USER_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";
// No space after "natural language." in the release.
const MMTAG_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant is able to understand the visual content that the user provides, and assist the user with a \
variety of tasks using natural language.\
The visual content will be provided with the following format: <Image>visual content</Image>.";
const LLAMA_2_SYSTEM: &str = "You are a helpful, respectful and honest assistant. Always answer as helpfully \
as possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, \
dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n\
If a question does not make any sense, or is not factually coherent, explain why instead of answering something \
not correct. If you don't know the answer to a question, please don't share false information.";
const LLAVA_LLAMA_2_SYSTEM: &str = "You are a helpful language and vision assistant. You are able to understand \
the visual content that the user provides, and assist the user with a variety of tasks using natural language.";
const MPT_SYSTEM: &str = "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. \
The assistant gives helpful and honest answers.";
const CHATML_DIRECT_SYSTEM: &str = "<|im_start|>system\nAnswer the questions.";
const CHATML_ROLES: (&str, &str) = ("<|im_start|>user\n", "<|im_start|>assistant\n");

const VICUNA_V0_QUESTION: &str = "What are the key differences between renewable and non-renewable energy sources?";
const VICUNA_V0_ANSWER: &str = "Renewable energy sources are those that can be replenished naturally in a \
relatively short amount of time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy \
sources, on the other hand, are finite and will eventually be depleted, such as coal, oil, and natural gas. \
Here are some key differences between renewable and non-renewable energy sources:\n\
1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources are \
finite and will eventually run out.\n\
2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable \
sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n\
3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower \
operational costs than non-renewable sources.\n\
4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations than \
non-renewable sources.\n\
5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations and \
needs, while non-renewable sources are more rigid and inflexible.\n\
6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable \
sources are not, and their depletion can lead to economic and social instability.\n";

fn template(
    system: &str,
    roles: (&str, &str),
    sep_style: SeparatorStyle,
    sep: &str,
    sep2: Option<&str>,
    version: &str,
) -> Conversation {
    Conversation {
        system: system.to_owned(),
        roles: [roles.0.to_owned(), roles.1.to_owned()],
        messages: Vec::new(),
        sep_style,
        sep: sep.to_owned(),
        sep2: sep2.map(str::to_owned),
        version: version.to_owned(),
    }
}

/// A fresh copy of the release's template `name` (`conv_templates[name].copy()`).
pub fn template_by_name(name: &str) -> Result<Conversation> {
    use SeparatorStyle::*;
    let human = ("Human", "Assistant");
    let user = ("USER", "ASSISTANT");
    let conversation = match name {
        "default" | "v0" => {
            let mut conv = template(HUMAN_SYSTEM, human, Single, "###", None, "Unknown");
            // The release ships this template with an example exchange that every prompt repeats.
            for (role, text) in [(human.0, VICUNA_V0_QUESTION), (human.1, VICUNA_V0_ANSWER)] {
                conv.messages.push(Message { role: role.into(), text: Some(text.into()), image: false });
            }
            conv
        }
        "v1" | "vicuna_v1" => template(USER_SYSTEM, user, Two, " ", Some("</s>"), "v1"),
        "llama_2" => template(LLAMA_2_SYSTEM, user, Llama2, "<s>", Some("</s>"), "llama_v2"),
        "mistral_instruct" => template("", user, Llama2, "", Some("</s>"), "llama_v2"),
        "chatml_direct" | "mistral_direct" => {
            template(CHATML_DIRECT_SYSTEM, CHATML_ROLES, Mpt, "<|im_end|>", None, "mpt")
        }
        "plain" | "v0_plain" => template("", ("", ""), Plain, "\n", None, "Unknown"),
        "llava_v0" => template(HUMAN_SYSTEM, human, Single, "###", None, "Unknown"),
        "v0_mmtag" => template(MMTAG_SYSTEM, human, Single, "###", None, "v0_mmtag"),
        "llava_v1" => template(HUMAN_SYSTEM, user, Two, " ", Some("</s>"), "v1"),
        "v1_mmtag" => template(MMTAG_SYSTEM, user, Two, " ", Some("</s>"), "v1_mmtag"),
        "llava_llama_2" => template(LLAVA_LLAMA_2_SYSTEM, user, Llama2, "<s>", Some("</s>"), "llama_v2"),
        "mpt" => template(MPT_SYSTEM, CHATML_ROLES, Mpt, "<|im_end|>", None, "mpt"),
        _ => {
            return Err(Error::Prompt(format!(
                "unknown conversation template `{name}` (known: {})",
                TEMPLATE_NAMES.join(", ")
            )))
        }
    };
    Ok(conversation)
}
