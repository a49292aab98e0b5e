/* test_version.c - one version in three places (STYLE 23): conc.h's title line, the
   CONC_VERSION_* macros and meson's project(version:) agree, and the newest REVISION
   HISTORY entry names it.

   usage: test_version PATH/TO/conc.h MESON_PROJECT_VERSION   (tests/meson.build passes both) */
#include "conc.h"
#include "tap.h"

static const char *header_path, *meson_version;
static char macro_version[64];

TEST(macros_agree) {
    char s[64];
    snprintf(s, sizeof s, "%d.%d.%d", CONC_VERSION_MAJOR, CONC_VERSION_MINOR,
             CONC_VERSION_PATCH);
    if (strcmp(s, CONC_VERSION_STRING) != 0)
        TAP__FAIL("CONC_VERSION_* say %s, CONC_VERSION_STRING says %s", s, CONC_VERSION_STRING);
    snprintf(macro_version, sizeof macro_version, "%s", s);
}

TEST(title_line_agrees) {
    char line[512], want[128];
    FILE *f = fopen(header_path, "r");
    ASSERT(f != NULL);
    ASSERT(fgets(line, sizeof line, f) != NULL);
    fclose(f);
    line[strcspn(line, "\r\n")] = '\0';
    snprintf(want, sizeof want, "/* conc.h - v%s - ", macro_version);
    if (strncmp(line, want, strlen(want)) != 0)
        TAP__FAIL("title line \"%s\" does not start with \"%s\"", line, want);
}

TEST(meson_agrees) {
    if (strcmp(meson_version, macro_version) != 0)
        TAP__FAIL("meson project version %s, conc.h says %s", meson_version, macro_version);
}

TEST(revision_history_names_it) {
    char line[512];
    int in_history = 0, checked = 0;
    FILE *f = fopen(header_path, "r");
    ASSERT(f != NULL);
    /* the first non-blank line after the heading is the newest entry: "0.1.0  ..." */
    while (!checked && fgets(line, sizeof line, f)) {
        const char *p = line;
        size_t n = strlen(macro_version);
        while (*p == ' ' || *p == '\t') p++;
        if (!in_history) {
            in_history = strncmp(p, "REVISION HISTORY", 16) == 0;
            continue;
        }
        if (*p == '\n' || *p == '\r' || *p == '\0') continue;
        if (*p == 'v') p++;
        if (strncmp(p, macro_version, n) != 0 || (p[n] != ' ' && p[n] != '\t'))
            TAP__FAIL("newest revision history entry is \"%.60s\", not %s", p, macro_version);
        checked = 1;
    }
    fclose(f);
    EXPECT(in_history);
    EXPECT(checked);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PATH/TO/conc.h MESON_PROJECT_VERSION\n", argv[0]);
        return 2;
    }
    header_path = argv[1];
    meson_version = argv[2];
    RUN(macros_agree);
    RUN(title_line_agrees);
    RUN(meson_agrees);
    RUN(revision_history_names_it);
    return tap_done();
}
