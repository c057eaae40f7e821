// A Java client that caches DNS forever, as a JVM with a security manager (or
// networkaddress.cache.ttl=-1) does: it resolves its target's host name once, then calls the
// URL again and again, one call per line of output, until the stop file exists or it has made
// the most calls it may. Run as a single source file (JDK 11+):
//
//   java -Dsun.net.inetaddr.ttl=-1 CachingCaller.java URL STOP_FILE MAX_CALLS GAP_MS
//
// Output: "resolved <address>" first, then per call "ok <address> <status> <body>" or
// "FAILED <address> <error>", where <address> is what the JVM's cache holds for the host.
import java.io.IOException;
import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.InetAddress;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

public class CachingCaller {
    public static void main(String[] args) throws Exception {
        // The security property, as well as the system property on the command line.
        java.security.Security.setProperty("networkaddress.cache.ttl", "-1");
        URL url = new URL(args[0]);
        Path stop = Path.of(args[1]);
        int maxCalls = Integer.parseInt(args[2]);
        long gapMs = Long.parseLong(args[3]);
        String host = url.getHost();
        System.out.println("resolved " + InetAddress.getByName(host).getHostAddress());
        System.out.flush();
        for (int i = 0; i < maxCalls && !Files.exists(stop); i++) {
            String cached = InetAddress.getByName(host).getHostAddress();
            try {
                HttpURLConnection c = (HttpURLConnection) url.openConnection();
                c.setConnectTimeout(2000);
                c.setReadTimeout(5000);
                int status = c.getResponseCode();
                String body;
                try (InputStream in = status < 400 ? c.getInputStream() : c.getErrorStream()) {
                    body = in == null ? "" : new String(in.readAllBytes(), StandardCharsets.UTF_8);
                }
                String line = status == 200 ? "ok" : "FAILED";
                System.out.println(line + " " + cached + " " + status + " " + body.replace('\n', ' '));
            } catch (IOException e) {
                System.out.println("FAILED " + cached + " " + e);
            }
            System.out.flush();
            Thread.sleep(gapMs);
        }
    }
}
