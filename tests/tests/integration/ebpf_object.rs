//! Checks on the eBPF object the agent embeds, without loading it.
//!
//! `no_memory_builtin_is_called`: LLVM turns zeroing and copying of stack objects it
//! cannot do in a few stores into calls to `memset` / `memcpy` / `memmove`, which on BPF
//! are subprograms looping over bytes (issue 12: `mem::zeroed()` of the FIB parameters
//! cost ~34 ns per packet, a 3-byte padding field a call per packet). The object must
//! call none of them: every BPF-to-BPF call is a relocation in a code section, so a
//! relocation naming one of them is such a call; the message names the calling function
//! and the instruction.

use lb_agent::dataplane::loader::LB_OBJECT;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionKind};

/// The compiler's memory builtins (compiler_builtins' byte loops in the object).
const BUILTINS: [&str; 5] = ["memset", "memcpy", "memmove", "memcmp", "bcmp"];

#[test]
fn no_memory_builtin_is_called() -> anyhow::Result<()> {
    let file = object::File::parse(LB_OBJECT)?;
    let mut calls = Vec::new();
    let mut code_relocations = 0;
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let section_name = section.name()?;
        for (offset, reloc) in section.relocations() {
            code_relocations += 1;
            let RelocationTarget::Symbol(index) = reloc.target() else {
                continue;
            };
            let target = file.symbol_by_index(index)?.name()?;
            if !BUILTINS.contains(&target) {
                continue;
            }
            // The function of this section that holds the call.
            let caller = file
                .symbols()
                .filter(|s| {
                    s.section_index() == Some(section.index())
                        && s.kind() == object::SymbolKind::Text
                        && s.address() <= offset
                        && offset < s.address() + s.size()
                })
                .find_map(|s| s.name().ok())
                .unwrap_or("?");
            calls.push(format!(
                "{caller} calls {target} (section {section_name}, instruction {})",
                offset / 8
            ));
        }
    }
    // The check means something only if calls and map references show up as
    // relocations at all.
    anyhow::ensure!(
        code_relocations > 0,
        "no relocation in any code section: this check would see no call"
    );
    anyhow::ensure!(
        calls.is_empty(),
        "the eBPF object calls memory builtins (byte loops per packet):\n  {}",
        calls.join("\n  ")
    );
    Ok(())
}
