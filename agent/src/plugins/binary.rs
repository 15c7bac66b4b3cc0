//! What a connector binary is built for, read from its headers before it is run or loaded.
//!
//! Why: the loader and the kernel report a foreign or cut-short binary in ways that point an
//! admin elsewhere. glibc's `dlopen` answers "No such file or directory" for a library built
//! for another architecture; a truncated library crashes the worker that maps it with SIGBUS;
//! a truncated program dies of SIGSEGV when asked for `info`. Its headers say what is wrong:
//! which system and machine it was built for, and how long the file should be.
//!
//! A script's header is its `#!` line: for an interpreter that is missing, or that a file
//! saved with Windows line endings names with a trailing carriage return, `execve` answers
//! "No such file or directory" of a file that is plainly there. It says the same of a program
//! whose program loader (the ELF interpreter a dynamically linked program names) is missing:
//! a build for a musl-based Linux such as Alpine, or a 32-bit program without the 32-bit C
//! library.
//!
//! Only headers are read (through [`ReadCache`], not the whole file), with `object`'s
//! bounds-checked parsers: the file is untrusted and this runs in the agent itself.
//! Anything else (a text file, an unknown format) passes: whoever runs or loads it reports
//! what it is.

use std::fs::File;
use std::path::Path;

use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
use object::read::pe::ImageNtHeaders;
use object::{elf, pe, Endianness, FileKind, LittleEndian as LE, ReadCache, ReadRef};

/// Why this machine cannot run or load a binary.
#[derive(Debug, thiserror::Error)]
pub enum BinaryProblem {
    /// Another system's format (a PE file on Linux, say).
    #[error("built for {found}, but this agent runs on {host}: use the connector's {host} build")]
    WrongSystem {
        /// The system the file is for, with its format.
        found: &'static str,
        /// The system the agent runs on.
        host: &'static str,
    },
    /// This system's format, another machine (aarch64 on x86_64, say).
    #[error("built for {found}, but this machine is {host}: use the connector's {host} build")]
    WrongArchitecture {
        /// The machine the file is for.
        found: String,
        /// `std::env::consts::ARCH`.
        host: &'static str,
    },
    /// Shorter than its headers say it is.
    #[error(
        "cut short: the file is {len} bytes, but its {format} headers describe at least {needed} \
         bytes (an interrupted copy or download? copy the whole file again)"
    )]
    Truncated {
        /// The file's length.
        len: u64,
        /// The least length its headers describe.
        needed: u64,
        /// ELF or PE.
        format: &'static str,
    },
    /// Too short to hold the header its first bytes begin.
    #[error(
        "cut short: the file is {len} bytes, too short for its own {format} header (an \
         interrupted copy or download? copy the whole file again)"
    )]
    TruncatedHeader {
        /// The file's length.
        len: u64,
        /// ELF or PE.
        format: &'static str,
    },
    /// Headers the parser cannot read.
    #[error("not a valid {format} file: {detail}")]
    Damaged {
        /// ELF or PE.
        format: &'static str,
        /// The parser's words.
        detail: String,
    },
    /// Zero bytes.
    #[error("the file is empty (an interrupted copy or download? copy the whole file again)")]
    Empty,
    /// A script's `#!` line ends in `\r`.
    #[error(
        "its #! line ends in a carriage return: the file has Windows (CRLF) line endings, so the \
         system looks for an interpreter whose name ends in \\r (convert it: `dos2unix <file>`)"
    )]
    WindowsLineEndings,
    /// A script whose `#!` interpreter (an absolute path) is not there.
    #[error(
        "its #! line names the interpreter {interpreter}, which is not on this machine (install \
         it, or correct the #! line)"
    )]
    MissingInterpreter {
        /// The path the `#!` line names.
        interpreter: String,
    },
    /// A dynamically linked program whose program loader (its ELF interpreter, an absolute
    /// path) is not on this machine: `execve` answers "No such file or directory".
    #[error(
        "needs the program loader {loader}, which is not on this machine{hint}: use a build for \
         this system (a statically linked build runs on any Linux)"
    )]
    MissingLoader {
        /// The loader the program names.
        loader: String,
        /// Why it may be missing, where the loader's name says (with a leading " (").
        hint: &'static str,
    },
    /// A `#!` line with nothing after it.
    #[error("its #! line names no interpreter (a script starts with one such as #!/bin/sh)")]
    NoInterpreter,
    /// The file could not be read.
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
}

/// The executable formats: each is what one system runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Elf,
    Pe,
    MachO,
}

impl Format {
    /// What an admin calls the system that runs this format (in a "built for …" sentence).
    fn built_for(self) -> &'static str {
        match self {
            Format::Elf => "Linux (an ELF file)",
            Format::Pe => "Windows (a PE file)",
            Format::MachO => "macOS (a Mach-O file)",
        }
    }

    fn system(self) -> &'static str {
        match self {
            Format::Elf => "Linux",
            Format::Pe => "Windows",
            Format::MachO => "macOS",
        }
    }
}

/// What becomes of the file: run as a program of its own, or loaded into a process of the
/// agent's binary (a worker, or the agent itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// A program (an executable, a bundle's `main`): the system may also run it in a
    /// compatibility mode (32-bit x86 on x86_64, 32-bit arm on aarch64, x86_64 on Windows on
    /// arm64), so those pass.
    Run,
    /// A library: only this process's own architecture loads.
    Load,
}

/// The system and machines the agent runs on, in the terms of the binary's headers.
#[derive(Clone, Copy, Debug)]
struct Host {
    format: Format,
    /// The `e_machine` (ELF) or `FileHeader.machine` (PE) values a file may have for its use,
    /// this process's own first; empty where this module does not know them, and then the
    /// architecture is not checked.
    machines: &'static [u16],
    /// `std::env::consts::ARCH`.
    arch: &'static str,
    /// For a program (not a library) on Linux: whether a path exists, to check that its
    /// program loader is there.
    loader_exists: Option<fn(&Path) -> bool>,
}

impl Host {
    /// `None` on a system whose format this module does not check.
    fn current(use_: Use) -> Option<Host> {
        let arch = std::env::consts::ARCH;
        let run = use_ == Use::Run;
        let (format, machines): (Format, &'static [u16]) = if cfg!(windows) {
            const AMD64: u16 = pe::IMAGE_FILE_MACHINE_AMD64.0;
            const ARM64: u16 = pe::IMAGE_FILE_MACHINE_ARM64.0;
            const I386: u16 = pe::IMAGE_FILE_MACHINE_I386.0;
            let machines: &'static [u16] = match (arch, run) {
                ("x86_64", true) => &[AMD64, I386],
                ("x86_64", false) => &[AMD64],
                ("aarch64", true) => &[ARM64, AMD64, I386],
                ("aarch64", false) => &[ARM64],
                ("x86", _) => &[I386],
                _ => &[],
            };
            (Format::Pe, machines)
        } else if cfg!(target_vendor = "apple") {
            (Format::MachO, &[])
        } else if cfg!(target_os = "linux") {
            const X86_64: u16 = elf::EM_X86_64.0;
            const I386: u16 = elf::EM_386.0;
            const AARCH64: u16 = elf::EM_AARCH64.0;
            const ARM: u16 = elf::EM_ARM.0;
            let machines: &'static [u16] = match (arch, run) {
                ("x86_64", true) => &[X86_64, I386],
                ("x86_64", false) => &[X86_64],
                ("aarch64", true) => &[AARCH64, ARM],
                ("aarch64", false) => &[AARCH64],
                ("x86", _) => &[I386],
                ("arm", _) => &[ARM],
                ("riscv64", _) => &[elf::EM_RISCV.0],
                ("powerpc64", _) => &[elf::EM_PPC64.0],
                ("s390x", _) => &[elf::EM_S390.0],
                ("loongarch64", _) => &[elf::EM_LOONGARCH.0],
                _ => &[],
            };
            (Format::Elf, machines)
        } else {
            return None;
        };
        let loader_exists: Option<fn(&Path) -> bool> =
            (run && format == Format::Elf).then_some(|path: &Path| path.exists());
        Some(Host {
            format,
            machines,
            arch,
            loader_exists,
        })
    }
}

/// How much of a script's first line the check reads: Linux reads 256 bytes of it since 5.1
/// (127 before), longer lines are cut there.
const SHEBANG_MAX: u64 = 256;

/// Checks that `path`, if it is a native binary, is one this machine can run or load (`use_`)
/// and is whole, and (on Unix) that a program that is a script names an interpreter that is
/// there. Text and unknown formats pass.
pub fn check(path: &Path, use_: Use) -> Result<(), BinaryProblem> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        // Else "not a program for this machine (… #! …)", or the loader's "file too short".
        return Err(BinaryProblem::Empty);
    }
    let data = ReadCache::new(file);
    // A library is no script, whatever its first bytes: the loader names what it is.
    if cfg!(unix) && use_ == Use::Run {
        let head = (&data)
            .read_bytes_at(0, len.min(SHEBANG_MAX))
            .unwrap_or(&[]);
        if head.starts_with(b"#!") {
            return check_shebang(head, |interpreter| interpreter.exists());
        }
    }
    let Some(host) = Host::current(use_) else {
        return Ok(());
    };
    check_data(&data, len, host)
}

/// A script's `#!` line, parsed as the kernel does (the interpreter runs to the first blank,
/// what follows is one argument; see the module's doc for why).
fn check_shebang(head: &[u8], exists: impl Fn(&Path) -> bool) -> Result<(), BinaryProblem> {
    let line = head[2..].split(|&b| b == b'\n').next().unwrap_or_default();
    if line.ends_with(b"\r") {
        return Err(BinaryProblem::WindowsLineEndings);
    }
    let line = line.trim_ascii_start();
    let interpreter = line
        .split(|&b| b == b' ' || b == b'\t')
        .next()
        .unwrap_or_default();
    if interpreter.is_empty() {
        return Err(BinaryProblem::NoInterpreter);
    }
    // A relative interpreter is looked up from the working directory, which the connector's
    // runner sets; a name that is not UTF-8 is left to `execve`.
    match std::str::from_utf8(interpreter) {
        Ok(name) if name.starts_with('/') && !exists(Path::new(name)) => {
            Err(BinaryProblem::MissingInterpreter {
                interpreter: name.to_string(),
            })
        }
        _ => Ok(()),
    }
}

fn check_data<'a, R: ReadRef<'a>>(data: R, len: u64, host: Host) -> Result<(), BinaryProblem> {
    let magic = data.read_bytes_at(0, len.min(4)).unwrap_or(&[]);
    let kind = match FileKind::parse(data) {
        Ok(kind) => kind,
        // The magic of a format, but too short for `FileKind` to tell which class it is.
        Err(_) if magic == elf::ELFMAG && len < 64 => {
            return Err(BinaryProblem::TruncatedHeader { len, format: "ELF" })
        }
        Err(_) if magic.starts_with(b"MZ") && host.format == Format::Pe => {
            return Err(pe_header_problem(data, len));
        }
        Err(_) => return Ok(()),
    };
    let format = match kind {
        FileKind::Elf32 | FileKind::Elf64 => Format::Elf,
        FileKind::Pe32 | FileKind::Pe64 => Format::Pe,
        FileKind::MachO32 | FileKind::MachO64 | FileKind::MachOFat32 | FileKind::MachOFat64 => {
            Format::MachO
        }
        // Archives, COFF objects and the rest: the loader's own error names them.
        _ => return Ok(()),
    };
    if format != host.format {
        return Err(BinaryProblem::WrongSystem {
            found: format.built_for(),
            host: host.format.system(),
        });
    }
    match kind {
        FileKind::Elf32 => check_elf::<elf::FileHeader32<Endianness>, R>(data, len, host),
        FileKind::Elf64 => check_elf::<elf::FileHeader64<Endianness>, R>(data, len, host),
        FileKind::Pe32 => check_pe::<pe::ImageNtHeaders32, R>(data, len, host),
        FileKind::Pe64 => check_pe::<pe::ImageNtHeaders64, R>(data, len, host),
        // Mach-O: the macOS loader's errors already name the architectures ("have 'arm64',
        // need 'x86_64'"), and fat files hold several.
        _ => Ok(()),
    }
}

/// `a + b * c` that saturates: header fields are untrusted.
fn end_of(offset: u64, count: u64, size: u64) -> u64 {
    offset.saturating_add(count.saturating_mul(size))
}

/// `Truncated` if the headers of a file of `len` bytes describe `needed`.
fn fits(len: u64, needed: u64, format: &'static str) -> Result<(), BinaryProblem> {
    if needed > len {
        Err(BinaryProblem::Truncated {
            len,
            needed,
            format,
        })
    } else {
        Ok(())
    }
}

fn check_machine(found: u16, host: Host, name: fn(u16) -> String) -> Result<(), BinaryProblem> {
    if host.machines.is_empty() || host.machines.contains(&found) {
        Ok(())
    } else {
        Err(BinaryProblem::WrongArchitecture {
            found: name(found),
            host: host.arch,
        })
    }
}

fn check_elf<'a, H, R>(data: R, len: u64, host: Host) -> Result<(), BinaryProblem>
where
    H: FileHeader<Endian = Endianness>,
    R: ReadRef<'a>,
{
    let damaged = |detail| BinaryProblem::Damaged {
        format: "ELF",
        detail,
    };
    let header_size = std::mem::size_of::<H>() as u64;
    if len < header_size {
        return Err(BinaryProblem::TruncatedHeader { len, format: "ELF" });
    }
    let header = H::parse(data).map_err(|e| damaged(e.to_string()))?;
    let endian = header.endian().map_err(|e| damaged(e.to_string()))?;
    check_machine(header.e_machine(endian).0, host, elf_machine_name)?;

    let truncated = |needed| fits(len, needed, "ELF");
    // First the tables as the file header places them (extended counts live in section 0,
    // which must be in the file to be read).
    let phoff: u64 = header.e_phoff(endian).into();
    let shoff: u64 = header.e_shoff(endian).into();
    let phentsize = u64::from(header.e_phentsize(endian));
    let shentsize = u64::from(header.e_shentsize(endian));
    let mut needed = header_size;
    let (e_phnum, e_shnum) = (header.e_phnum(endian), header.e_shnum(endian));
    if phoff != 0 && e_phnum != elf::PN_XNUM {
        needed = needed.max(end_of(phoff, e_phnum.into(), phentsize));
    }
    if shoff != 0 {
        // 0 sections with a table: the count is in section 0.
        needed = needed.max(end_of(shoff, e_shnum.max(1).into(), shentsize));
    }
    truncated(needed)?;
    let phnum = header
        .phnum(endian, data)
        .map_err(|e| damaged(e.to_string()))?;
    let shnum = header
        .shnum(endian, data)
        .map_err(|e| damaged(e.to_string()))?;
    if phoff != 0 {
        needed = needed.max(end_of(phoff, phnum.into(), phentsize));
    }
    if shoff != 0 {
        needed = needed.max(end_of(shoff, shnum.into(), shentsize));
    }
    truncated(needed)?;
    // Then what the tables place: every segment's and section's bytes in the file.
    let segments = header
        .program_headers(endian, data)
        .map_err(|e| damaged(e.to_string()))?;
    for segment in segments {
        if segment.p_type(endian) != elf::PT_NULL {
            let offset: u64 = segment.p_offset(endian).into();
            needed = needed.max(end_of(offset, 1, segment.p_filesz(endian).into()));
        }
    }
    for section in header
        .section_headers(endian, data)
        .map_err(|e| damaged(e.to_string()))?
    {
        let kind = section.sh_type(endian);
        if kind != elf::SHT_NOBITS && kind != elf::SHT_NULL {
            let offset: u64 = section.sh_offset(endian).into();
            needed = needed.max(end_of(offset, 1, section.sh_size(endian).into()));
        }
    }
    truncated(needed)?;
    let Some(exists) = host.loader_exists else {
        return Ok(());
    };
    for segment in segments {
        let interpreter = segment
            .interpreter(endian, data)
            .map_err(|e| damaged(e.to_string()))?;
        if let Some(loader) = interpreter.and_then(|name| std::str::from_utf8(name).ok()) {
            // A relative loader is looked up from the working directory: left to `execve`.
            if loader.starts_with('/') && !exists(Path::new(loader)) {
                return Err(BinaryProblem::MissingLoader {
                    loader: loader.to_string(),
                    hint: loader_hint(loader, header.is_class_64()),
                });
            }
        }
    }
    Ok(())
}

/// What a missing loader's name tells of the program (a clause for [`BinaryProblem::MissingLoader`]).
fn loader_hint(loader: &str, class_64: bool) -> &'static str {
    if loader.contains("musl") {
        " (the program was built for a Linux with the musl C library, such as Alpine)"
    } else if !class_64 && cfg!(target_pointer_width = "64") {
        " (a 32-bit program: install the system's 32-bit C library, or use a 64-bit build)"
    } else if loader.starts_with("/nix/") {
        " (the program was built for NixOS)"
    } else {
        ""
    }
}

/// Why a file that starts like a PE file is not one `FileKind` recognises.
fn pe_header_problem<'a, R: ReadRef<'a>>(data: R, len: u64) -> BinaryProblem {
    let nt_offset = pe::ImageDosHeader::parse(data)
        .map(|dos| u64::from(dos.nt_headers_offset()))
        .unwrap_or(u64::MAX);
    // `FileKind` reads the NT headers as the 32-bit layout, the shorter one, to find the magic.
    let nt_headers = std::mem::size_of::<pe::ImageNtHeaders32>() as u64;
    if end_of(nt_offset, 1, nt_headers) > len {
        BinaryProblem::TruncatedHeader { len, format: "PE" }
    } else {
        BinaryProblem::Damaged {
            format: "PE",
            detail: "no valid PE headers after the DOS header".into(),
        }
    }
}

fn check_pe<'a, Pe, R>(data: R, len: u64, host: Host) -> Result<(), BinaryProblem>
where
    Pe: ImageNtHeaders,
    R: ReadRef<'a>,
{
    let damaged = |detail| BinaryProblem::Damaged {
        format: "PE",
        detail,
    };
    let truncated_header = BinaryProblem::TruncatedHeader { len, format: "PE" };
    let dos = pe::ImageDosHeader::parse(data).map_err(|e| damaged(e.to_string()))?;
    let mut offset = u64::from(dos.nt_headers_offset());
    // `FileKind` read the signature and the optional header's magic; what fails now is the
    // rest of the optional header and the data directories.
    let (nt, directories) = Pe::parse(data, &mut offset).map_err(|_| truncated_header)?;
    let file_header = nt.file_header();
    check_machine(file_header.machine.get(LE).0, host, pe_machine_name)?;

    let sections = u64::from(file_header.number_of_sections.get(LE));
    let section_header_size = std::mem::size_of::<pe::ImageSectionHeader>() as u64;
    let mut needed = end_of(offset, sections, section_header_size);
    needed = needed.max(u64::from(
        object::read::pe::ImageOptionalHeader::size_of_headers(nt.optional_header()),
    ));
    let truncated = |needed| fits(len, needed, "PE");
    truncated(needed)?;
    for section in nt
        .sections(data, offset)
        .map_err(|e| damaged(e.to_string()))?
        .iter()
    {
        let size = u64::from(section.size_of_raw_data.get(LE));
        if size > 0 {
            let start = u64::from(section.pointer_to_raw_data.get(LE));
            needed = needed.max(end_of(start, 1, size));
        }
    }
    // An Authenticode signature sits after the sections, at a file offset.
    if let Some(signature) = directories.get(pe::IMAGE_DIRECTORY_ENTRY_SECURITY) {
        let (start, size) = (
            u64::from(signature.virtual_address.get(LE)),
            u64::from(signature.size.get(LE)),
        );
        if size > 0 {
            needed = needed.max(end_of(start, 1, size));
        }
    }
    truncated(needed)
}

fn elf_machine_name(machine: u16) -> String {
    let name = match elf::Machine(machine) {
        elf::EM_X86_64 => "x86_64",
        elf::EM_AARCH64 => "aarch64",
        elf::EM_386 => "x86 (32-bit)",
        elf::EM_ARM => "arm (32-bit)",
        elf::EM_RISCV => "riscv",
        elf::EM_PPC64 => "powerpc64",
        elf::EM_PPC => "powerpc (32-bit)",
        elf::EM_S390 => "s390x",
        elf::EM_LOONGARCH => "loongarch64",
        elf::EM_MIPS => "mips",
        _ => return format!("ELF machine {machine:#x}"),
    };
    name.to_string()
}

fn pe_machine_name(machine: u16) -> String {
    let name = match pe::Machine(machine) {
        pe::IMAGE_FILE_MACHINE_AMD64 => "x86_64",
        pe::IMAGE_FILE_MACHINE_ARM64 => "aarch64",
        pe::IMAGE_FILE_MACHINE_ARM64EC => "aarch64 (ARM64EC)",
        pe::IMAGE_FILE_MACHINE_I386 => "x86 (32-bit)",
        pe::IMAGE_FILE_MACHINE_ARMNT => "arm (32-bit)",
        _ => return format!("PE machine {machine:#06x}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux_x86_64() -> Host {
        Host {
            format: Format::Elf,
            machines: &[elf::EM_X86_64.0],
            arch: "x86_64",
            loader_exists: None,
        }
    }

    fn windows_x86_64() -> Host {
        Host {
            format: Format::Pe,
            machines: &[pe::IMAGE_FILE_MACHINE_AMD64.0],
            arch: "x86_64",
            loader_exists: None,
        }
    }

    #[test]
    fn a_program_the_system_runs_in_a_compatibility_mode_passes_but_not_as_a_library() {
        // 32-bit x86 on x86_64 Linux: an ELF32 header with EM_386.
        let mut elf32 = elf_header(elf::ELFCLASS32, elf::EM_386, 52);
        put(&mut elf32, 40, &52u16.to_le_bytes()); // e_ehsize
        let linux = |use_| match use_ {
            Use::Run => Host {
                machines: &[elf::EM_X86_64.0, elf::EM_386.0],
                ..linux_x86_64()
            },
            Use::Load => linux_x86_64(),
        };
        check_bytes(&elf32, linux(Use::Run)).unwrap();
        let problem = check_bytes(&elf32, linux(Use::Load)).unwrap_err();
        assert_eq!(
            problem.to_string(),
            "built for x86 (32-bit), but this machine is x86_64: use the connector's x86_64 build"
        );
        // The same rule as this machine applies it.
        if let (Some(run), Some(load)) = (Host::current(Use::Run), Host::current(Use::Load)) {
            assert!(load.machines.iter().all(|m| run.machines.contains(m)));
            assert_eq!(run.machines.first(), load.machines.first());
        }
    }

    fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
        bytes[at..at + value.len()].copy_from_slice(value);
    }

    /// `len` bytes starting with a little-endian ELF identification of `class`, `machine` and
    /// version 1; every other field zero.
    fn elf_header(class: elf::FileClass, machine: elf::Machine, len: usize) -> Vec<u8> {
        let mut header = vec![0u8; len];
        put(&mut header, 0, &elf::ELFMAG);
        put(&mut header, 4, &[class.0, elf::ELFDATA2LSB.0, 1]); // EI_VERSION: current
        put(&mut header, 18, &machine.0.to_le_bytes());
        put(&mut header, 20, &1u32.to_le_bytes()); // e_version
        header
    }

    /// A 64-bit PE file of 0x400 bytes as a linker lays it out: DOS header, NT headers at
    /// 0x40, one section header, headers padded to 0x200, one section of 0x200 bytes.
    fn pe64(machine: u16) -> Vec<u8> {
        let mut file = vec![0u8; 0x400];
        put(&mut file, 0, b"MZ");
        put(&mut file, 0x3c, &0x40u32.to_le_bytes());
        put(&mut file, 0x40, b"PE\0\0");
        let coff = 0x44;
        put(&mut file, coff, &machine.to_le_bytes());
        put(&mut file, coff + 2, &1u16.to_le_bytes()); // number_of_sections
        put(&mut file, coff + 16, &240u16.to_le_bytes()); // size_of_optional_header
        let optional = coff + 20;
        put(&mut file, optional, &0x20bu16.to_le_bytes()); // PE32+
        put(&mut file, optional + 60, &0x200u32.to_le_bytes()); // size_of_headers
        put(&mut file, optional + 108, &16u32.to_le_bytes()); // number_of_rva_and_sizes
        let section = optional + 240;
        put(&mut file, section, b".text\0\0\0");
        put(&mut file, section + 8, &0x10u32.to_le_bytes()); // virtual_size
        put(&mut file, section + 12, &0x1000u32.to_le_bytes()); // virtual_address
        put(&mut file, section + 16, &0x200u32.to_le_bytes()); // size_of_raw_data
        put(&mut file, section + 20, &0x200u32.to_le_bytes()); // pointer_to_raw_data
        file
    }

    fn check_bytes(bytes: &[u8], host: Host) -> Result<(), BinaryProblem> {
        check_data(bytes, bytes.len() as u64, host)
    }

    #[test]
    fn a_whole_pe_file_for_this_machine_passes() {
        check_bytes(&pe64(pe::IMAGE_FILE_MACHINE_AMD64.0), windows_x86_64()).unwrap();
    }

    #[test]
    fn a_cut_short_pe_file_names_the_length_its_headers_describe() {
        let file = pe64(pe::IMAGE_FILE_MACHINE_AMD64.0);
        // Cut in its section: the section table says it ends at 0x400.
        match check_bytes(&file[..0x300], windows_x86_64()) {
            Err(BinaryProblem::Truncated {
                len,
                needed,
                format,
            }) => {
                assert_eq!((len, needed, format), (0x300, 0x400, "PE"));
            }
            other => panic!("{other:?}"),
        }
        // Cut in its optional header, and before its NT headers.
        for cut in [0x80, 0x44] {
            match check_bytes(&file[..cut], windows_x86_64()) {
                Err(BinaryProblem::TruncatedHeader { len, format }) => {
                    assert_eq!((len, format), (cut as u64, "PE"));
                }
                other => panic!("cut at {cut:#x}: {other:?}"),
            }
        }
        // A signature placed after the sections is part of the file too.
        let mut signed = file.clone();
        put(&mut signed, 0x58 + 112 + 4 * 8, &0x400u32.to_le_bytes());
        put(&mut signed, 0x58 + 112 + 4 * 8 + 4, &0x100u32.to_le_bytes());
        match check_bytes(&signed, windows_x86_64()) {
            Err(BinaryProblem::Truncated { needed, .. }) => assert_eq!(needed, 0x500),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pe_file_for_another_architecture_or_system_is_named() {
        let arm = pe64(pe::IMAGE_FILE_MACHINE_ARM64.0);
        let problem = check_bytes(&arm, windows_x86_64()).unwrap_err();
        assert_eq!(
            problem.to_string(),
            "built for aarch64, but this machine is x86_64: use the connector's x86_64 build"
        );
        let problem =
            check_bytes(&pe64(pe::IMAGE_FILE_MACHINE_AMD64.0), linux_x86_64()).unwrap_err();
        assert_eq!(
            problem.to_string(),
            "built for Windows (a PE file), but this agent runs on Linux: use the connector's \
             Linux build"
        );
    }

    #[test]
    fn a_missing_loaders_name_says_what_the_program_was_built_for() {
        assert!(loader_hint("/lib/ld-musl-x86_64.so.1", true).contains("musl"));
        assert!(
            loader_hint("/nix/store/abc-glibc/lib/ld-linux-x86-64.so.2", true).contains("NixOS")
        );
        assert_eq!(loader_hint("/lib64/ld-linux-x86-64.so.2", true), "");
        let thirty_two = loader_hint("/lib/ld-linux.so.2", false);
        if cfg!(target_pointer_width = "64") {
            assert!(thirty_two.contains("32-bit"), "{thirty_two}");
        } else {
            assert_eq!(thirty_two, "");
        }
    }

    #[test]
    fn an_empty_file_is_named_empty_for_either_use() {
        let file = tempfile::NamedTempFile::new().unwrap();
        for use_ in [Use::Run, Use::Load] {
            let problem = check(file.path(), use_).unwrap_err();
            assert!(matches!(problem, BinaryProblem::Empty), "{problem:?}");
        }
    }

    #[test]
    fn text_and_unknown_formats_pass() {
        for bytes in [&b"not a library at all"[..], b"", b"MZ"] {
            check_bytes(bytes, linux_x86_64()).unwrap();
        }
    }

    #[test]
    fn a_scripts_interpreter_must_be_there_and_named_without_a_carriage_return() {
        let on_this_machine = |path: &Path| path == Path::new("/bin/sh");
        for good in [
            &b"#!/bin/sh\nexec my-connector \"$@\"\n"[..],
            b"#! /bin/sh -e\n",
            b"#!\t/bin/sh",
            // Looked up from the working directory, and through PATH by env: not checked here.
            b"#!./run\n",
        ] {
            check_shebang(good, on_this_machine).unwrap();
        }
        let problem = check_shebang(b"#!/bin/sh\r\necho hi\r\n", on_this_machine).unwrap_err();
        assert!(
            matches!(problem, BinaryProblem::WindowsLineEndings),
            "{problem:?}"
        );
        assert!(problem.to_string().contains("dos2unix"), "{problem}");
        // With an argument, the argument carries the \r (`env` would look for `python3\r`).
        let problem = check_shebang(b"#!/bin/sh python3\r\n", on_this_machine).unwrap_err();
        assert!(
            matches!(problem, BinaryProblem::WindowsLineEndings),
            "{problem:?}"
        );
        let problem = check_shebang(b"#!/opt/venv/bin/python3 -u\n", on_this_machine).unwrap_err();
        assert_eq!(
            problem.to_string(),
            "its #! line names the interpreter /opt/venv/bin/python3, which is not on this \
             machine (install it, or correct the #! line)"
        );
        for empty in [&b"#!\n"[..], b"#!   \n", b"#!"] {
            let problem = check_shebang(empty, on_this_machine).unwrap_err();
            assert!(
                matches!(problem, BinaryProblem::NoInterpreter),
                "{problem:?}"
            );
        }
    }

    #[test]
    fn hostile_header_fields_give_a_reason_not_a_panic() {
        // An ELF header whose tables lie at the end of the address space.
        let mut header = elf_header(elf::ELFCLASS64, elf::EM_X86_64, 64);
        put(&mut header, 32, &u64::MAX.to_le_bytes()); // e_phoff
        put(&mut header, 40, &(u64::MAX - 8).to_le_bytes()); // e_shoff
        put(&mut header, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut header, 56, &0xfffeu16.to_le_bytes()); // e_phnum
        put(&mut header, 58, &64u16.to_le_bytes()); // e_shentsize
        put(&mut header, 60, &0xffffu16.to_le_bytes()); // e_shnum
        match check_bytes(&header, linux_x86_64()) {
            Err(BinaryProblem::Truncated { needed, .. }) => assert_eq!(needed, u64::MAX),
            other => panic!("{other:?}"),
        }
        // The same in a PE file: a section past the end of any file.
        let mut file = pe64(pe::IMAGE_FILE_MACHINE_AMD64.0);
        put(&mut file, 0x58 + 240 + 16, &u32::MAX.to_le_bytes());
        put(&mut file, 0x58 + 240 + 20, &u32::MAX.to_le_bytes());
        match check_bytes(&file, windows_x86_64()) {
            Err(BinaryProblem::Truncated { needed, .. }) => {
                assert_eq!(needed, 2 * u64::from(u32::MAX));
            }
            other => panic!("{other:?}"),
        }
    }

    /// What a check must never say of a file cut short: that it is whole. (A cut before the
    /// magic leaves a file of no known format, which passes.)
    fn is_cut_short(problem: &Result<(), BinaryProblem>) -> bool {
        matches!(
            problem,
            Err(BinaryProblem::Truncated { .. } | BinaryProblem::TruncatedHeader { .. })
        )
    }

    /// Any host of a format: the properties hold whatever the architecture, and every loader
    /// named is taken to be there (so a mutated `PT_INTERP` is read, not skipped).
    fn any_machine(format: Format) -> Host {
        Host {
            format,
            machines: &[],
            arch: "x86_64",
            loader_exists: Some(|_| true),
        }
    }

    /// Up to 8 bytes set to any value, each in the first `head` bytes or the last `tail`
    /// (where the headers and the tables they place are), then the file cut anywhere or not.
    fn mutated(
        whole: &[u8],
        head: usize,
        tail: usize,
    ) -> impl proptest::strategy::Strategy<Value = Vec<u8>> + '_ {
        use proptest::prelude::*;
        let len = whole.len();
        let at = prop_oneof![0..head.min(len), len.saturating_sub(tail)..len];
        (
            prop::collection::vec((at, any::<u8>()), 1..8),
            prop::option::of(0..len),
        )
            .prop_map(move |(changes, cut)| {
                let mut file = whole.to_vec();
                for (at, value) in changes {
                    file[at] = value;
                }
                file.truncate(cut.unwrap_or(len));
                file
            })
    }

    /// [`pe64`] for x86_64, made once.
    fn small_pe() -> &'static [u8] {
        static FILE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        FILE.get_or_init(|| pe64(pe::IMAGE_FILE_MACHINE_AMD64.0))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        #[test]
        fn a_pe_file_cut_anywhere_past_its_magic_is_named_cut_short(cut in 4usize..0x400) {
            let problem = check_bytes(&small_pe()[..cut], any_machine(Format::Pe));
            proptest::prop_assert!(is_cut_short(&problem), "cut at {cut:#x}: {problem:?}");
        }

        #[test]
        fn a_damaged_pe_file_gets_an_answer_not_a_panic(file in mutated(small_pe(), 0x200, 0x200)) {
            // Any answer will do; a panic, an overflow or an endless loop fails the test.
            let _ = check_bytes(&file, any_machine(Format::Pe));
        }
    }

    /// This test's own executable: a real ELF file, its section table at its very end.
    #[cfg(target_os = "linux")]
    mod elf_files {
        use super::*;

        fn this_executable() -> (std::path::PathBuf, Vec<u8>, u64) {
            let path = std::env::current_exe().unwrap();
            let len = std::fs::metadata(&path).unwrap().len();
            let mut head = vec![0u8; 4096];
            std::io::Read::read_exact(&mut File::open(&path).unwrap(), &mut head).unwrap();
            (path, head, len)
        }

        #[test]
        fn this_machines_own_executable_passes() {
            let (path, _, _) = this_executable();
            check(&path, Use::Run).unwrap();
            check(&path, Use::Load).unwrap();
        }

        #[test]
        fn a_cut_short_elf_file_names_the_length_its_headers_describe() {
            let (_, head, len) = this_executable();
            let host = Host::current(Use::Run).unwrap();
            match check_bytes(&head, host) {
                Err(BinaryProblem::Truncated {
                    len: cut,
                    needed,
                    format,
                }) => assert_eq!((cut, needed, format), (4096, len, "ELF")),
                other => panic!("{other:?}"),
            }
            for cut in [40, 16, 4] {
                match check_bytes(&head[..cut], host) {
                    Err(BinaryProblem::TruncatedHeader { len, format }) => {
                        assert_eq!((len, format), (cut as u64, "ELF"));
                    }
                    other => panic!("cut at {cut}: {other:?}"),
                }
            }
        }

        /// A small real ELF program of this system (`/bin/sh`), whole, with its section table
        /// at its very end, as a linker lays it out (which the properties below rely on, so it
        /// is checked here).
        fn small_program() -> &'static [u8] {
            static FILE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            FILE.get_or_init(|| {
                let file = std::fs::read("/bin/sh").expect("/bin/sh is an ELF program on Linux");
                let header = elf::FileHeader64::<Endianness>::parse(&file[..]).unwrap();
                let endian = header.endian().unwrap();
                let table_end = header.e_shoff(endian)
                    + u64::from(header.e_shnum(endian)) * u64::from(header.e_shentsize(endian));
                assert_eq!(
                    table_end,
                    file.len() as u64,
                    "/bin/sh ends with its section table"
                );
                check_bytes(&file, any_machine(Format::Elf)).unwrap();
                file
            })
        }

        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

            /// A file being copied into the plugins folder, read before the copy ends.
            #[test]
            fn an_elf_file_cut_anywhere_past_its_magic_is_named_cut_short(
                cut in 4usize..small_program().len(),
            ) {
                let problem = check_bytes(&small_program()[..cut], any_machine(Format::Elf));
                proptest::prop_assert!(is_cut_short(&problem), "cut at {cut}: {problem:?}");
            }

            #[test]
            fn a_damaged_elf_file_gets_an_answer_not_a_panic(
                file in mutated(small_program(), 4096, 4096),
            ) {
                // Any answer will do; a panic, an overflow or an endless loop fails the test.
                let _ = check_bytes(&file, any_machine(Format::Elf));
            }
        }

        /// Where this test's executable names its program loader (`PT_INTERP`).
        fn loader_bytes(file: &[u8]) -> std::ops::Range<usize> {
            let header = elf::FileHeader64::<Endianness>::parse(file).unwrap();
            let endian = header.endian().unwrap();
            let segment = header
                .program_headers(endian, file)
                .unwrap()
                .iter()
                .find(|s| s.p_type(endian) == elf::PT_INTERP)
                .expect("the test executable is dynamically linked");
            let start = usize::try_from(segment.p_offset(endian)).unwrap();
            start..start + usize::try_from(segment.p_filesz(endian)).unwrap()
        }

        #[test]
        fn a_program_whose_loader_is_missing_is_named_but_not_a_library() {
            let (path, _, _) = this_executable();
            let mut file = std::fs::read(path).unwrap();
            let host = Host::current(Use::Run).unwrap();
            assert!(host.loader_exists.is_some());
            // Its own loader is there.
            check_bytes(&file, host).unwrap();
            // As a program built against musl names it (padded with NULs as a linker pads).
            // In a folder no machine has: a machine with musl installed has the real one.
            let musl = format!("/no/ld-musl-{}.so.1", std::env::consts::ARCH);
            let at = loader_bytes(&file);
            assert!(musl.len() < at.len(), "{at:?}");
            file[at.clone()].fill(0);
            put(&mut file, at.start, musl.as_bytes());
            match check_bytes(&file, host) {
                Err(problem @ BinaryProblem::MissingLoader { .. }) => assert_eq!(
                    problem.to_string(),
                    format!(
                        "needs the program loader {musl}, which is not on this machine (the \
                         program was built for a Linux with the musl C library, such as \
                         Alpine): use a build for this system (a statically linked build runs \
                         on any Linux)"
                    )
                ),
                other => panic!("{other:?}"),
            }
            // A library's interpreter is not run.
            check_bytes(&file, Host::current(Use::Load).unwrap()).unwrap();
            // A loader that is there passes, whatever its name.
            let everywhere = Host {
                loader_exists: Some(|_| true),
                ..host
            };
            check_bytes(&file, everywhere).unwrap();
            // An interpreter segment without its terminating NUL is a damaged file.
            file[at.clone()].fill(b'x');
            assert!(
                matches!(check_bytes(&file, host), Err(BinaryProblem::Damaged { .. })),
                "{:?}",
                check_bytes(&file, host)
            );
        }

        #[test]
        fn an_elf_file_for_another_architecture_or_system_is_named() {
            let (_, mut head, _) = this_executable();
            let host = Host::current(Use::Run).unwrap();
            let (other, name) = if host.machines.first() == Some(&elf::EM_AARCH64.0) {
                (elf::EM_X86_64, "x86_64")
            } else {
                (elf::EM_AARCH64, "aarch64")
            };
            put(&mut head, 18, &other.0.to_le_bytes());
            match check_bytes(&head, host) {
                Err(BinaryProblem::WrongArchitecture { found, host: arch }) => {
                    assert_eq!((found.as_str(), arch), (name, std::env::consts::ARCH));
                }
                problem => panic!("{problem:?}"),
            }
            let problem = check_bytes(&head, windows_x86_64()).unwrap_err();
            assert!(
                problem
                    .to_string()
                    .starts_with("built for Linux (an ELF file), but this agent runs on Windows"),
                "{problem}"
            );
        }
    }
}
